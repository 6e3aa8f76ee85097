from worker.model.labels import IMAGENET_CATEGORIES


def test_categories_shape():
    assert isinstance(IMAGENET_CATEGORIES, list)
    assert len(IMAGENET_CATEGORIES) == 1000
    assert len(set(IMAGENET_CATEGORIES)) == 1000
    assert all(isinstance(c, str) and c == c.strip() and c for c in IMAGENET_CATEGORIES)
    assert IMAGENET_CATEGORIES[0] == "tench"
    assert IMAGENET_CATEGORIES[258] == "Samoyed"
    assert IMAGENET_CATEGORIES[999] == "toilet tissue"


def test_agrees_with_pytorch_hub_classes_txt(fixtures_dir):
    txt = (fixtures_dir / "imagenet_classes.txt").read_text().splitlines()
    assert len(txt) == 1000 and txt[258] == "Samoyed"
    differ = {i: (a, b) for i, (a, b) in enumerate(zip(txt, IMAGENET_CATEGORIES)) if a != b}
    # The txt repeats two names; torchvision disambiguates them. Nothing else differs.
    assert differ == {134: ("crane", "crane bird"), 639: ("maillot", "maillot tank suit")}


def test_matches_torchvision():
    import pytest

    meta = pytest.importorskip("torchvision.models._meta")
    assert IMAGENET_CATEGORIES == list(meta._IMAGENET_CATEGORIES)
