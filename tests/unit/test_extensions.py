"""What a listing keeps (issue 21, "Photos the listing never sees"): keys of every supported
extension, lower and upper case, keys without an extension and other files, listed from moto's S3
server (one stream and fanned out), a local directory and an S3 Inventory report, by default,
with ``--extensions any`` and with a list; what is skipped is counted per extension. Then the
``--extensions`` option of the real CLI (exit 2 naming it, nothing left behind; a source of
non-images names the option), and a HEIC file made with pillow-heif labelled ok by
``hardnet classify``."""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from cluster import cli, image_bytes, read_jsonl
from hnq.formats import IMAGE_EXTENSIONS, NO_EXTENSION, ExtensionFilter
from hnq.sources import expand_sources, read_uri_list
from hnq.storage.s3.inventory import InventoryStats, iter_inventory
from hnq.storage.s3.listing import list_objects
from hnq.uris import path_to_file_uri
from image_samples import heic_bytes
from inventories import Row, put_inventory

IMAGES = sorted([f"lower/p{e}" for e in IMAGE_EXTENSIONS] + [f"upper/P{e.upper()}" for e in IMAGE_EXTENSIONS])
NO_EXT = ["cas/3f2a9c", "cas/77b01e", "cas/e5d4c3"]      # content-addressed keys
OTHERS = ["notes.txt", "upper/DATA.JSON", "lower/clip.mp4"]
ALL = IMAGES + NO_EXT + OTHERS
SKIPPED_BY_DEFAULT = Counter({NO_EXTENSION: 3, ".txt": 1, ".json": 1, ".mp4": 1})


@pytest.fixture
def bucket(s3):
    s3.create_bucket(Bucket="fmt")
    keys = [f"mix/{k}" for k in ALL] + ["mix/upper/", "other/z.jpg"]     # a folder marker; outside
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket="fmt", Key=k, Body=b"x"), keys))
    return "fmt"


def _rel(uris, base: str) -> list[str]:
    return sorted(str(u)[len(base):] for u in uris)


def test_every_supported_extension_is_in_both_cases():
    assert len(IMAGES) == 2 * len(IMAGE_EXTENSIONS)
    for ext in (".jpg", ".heic", ".heif", ".avif", ".jfif", ".jpe", ".jp2", ".j2k", ".pnm", ".tga", ".dds"):
        assert f"lower/p{ext}" in IMAGES and f"upper/P{ext.upper()}" in IMAGES


@pytest.mark.parametrize("threads", [1, 4])
def test_s3_listing_keeps_every_image_extension_in_any_case(bucket, threads):
    f = ExtensionFilter()
    got = list(list_objects(bucket, "mix/", threads=threads, depth=1, extensions=f))
    assert _rel(got, "s3://fmt/mix/") == IMAGES
    assert f.skipped == SKIPPED_BY_DEFAULT          # the folder marker is not counted
    assert json.loads(f.job_fields()["skipped_extensions"]) == dict(SKIPPED_BY_DEFAULT)


@pytest.mark.parametrize("threads", [1, 4])
def test_s3_listing_any_takes_every_key(bucket, threads):
    f = ExtensionFilter.of("any")
    got = list(list_objects(bucket, "mix/", threads=threads, depth=1, extensions=f))
    assert _rel(got, "s3://fmt/mix/") == sorted(ALL)
    assert f.total_skipped == 0 and f.job_fields() == {}


def test_s3_listing_a_list_keeps_only_those(bucket):
    f = ExtensionFilter.of("jpg,PNG")
    got = _rel(list_objects(bucket, "mix/", extensions=f), "s3://fmt/mix/")
    assert got == ["lower/p.jpg", "lower/p.png", "upper/P.JPG", "upper/P.PNG"]
    assert f.total_skipped == len(ALL) - 4 and f.skipped[".heic"] == 2 and f.skipped[NO_EXTENSION] == 3


def test_expand_sources_s3(bucket):
    f = ExtensionFilter()
    assert _rel(expand_sources(["s3://fmt/mix/"], extensions=f, list_threads=3), "s3://fmt/mix/") == IMAGES
    assert f.skipped == SKIPPED_BY_DEFAULT
    assert _rel(expand_sources(["s3://fmt/mix"], extensions="any"), "s3://fmt/mix/") == sorted(ALL)
    # a name without an extension is a folder first, with `any` too; an object alone is taken as given
    assert list(expand_sources(["s3://fmt/mix/cas"], extensions="any")) == [f"s3://fmt/mix/{k}" for k in NO_EXT]
    assert list(expand_sources(["s3://fmt/mix/cas"])) == ["s3://fmt/mix/cas"]    # nothing kept: as given
    assert list(expand_sources(["s3://fmt/mix/cas/3f2a9c"])) == ["s3://fmt/mix/cas/3f2a9c"]
    assert list(expand_sources(["s3://fmt/mix/upper/P.HEIC"], extensions="jpg")) == ["s3://fmt/mix/upper/P.HEIC"]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for k in ALL:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        (root / k).write_bytes(b"x")
    return root


def test_local_directory_keeps_every_image_extension_in_any_case(tree):
    base = path_to_file_uri(tree) + "/"
    f = ExtensionFilter()
    assert _rel(expand_sources([str(tree)], extensions=f), base) == IMAGES
    assert f.skipped == SKIPPED_BY_DEFAULT
    f = ExtensionFilter.of("any")
    assert _rel(expand_sources([str(tree)], extensions=f), base) == sorted(ALL)
    assert f.total_skipped == 0
    f = ExtensionFilter.of("heic,heif")
    assert _rel(expand_sources([str(tree)], extensions=f), base) == [
        "lower/p.heic", "lower/p.heif", "upper/P.HEIC", "upper/P.HEIF"]
    # a file named alone is taken whatever its extension; a URI list's directories are filtered
    assert list(expand_sources([str(tree / "cas" / "3f2a9c")])) == [path_to_file_uri(tree / "cas" / "3f2a9c")]
    lst = tree.parent / "list.txt"
    lst.write_text(f"{tree / 'notes.txt'}\n{tree / 'cas'}\n")
    f = ExtensionFilter()
    assert list(read_uri_list(str(lst), extensions=f)) == [path_to_file_uri(tree / "notes.txt")]
    assert f.skipped == Counter({NO_EXTENSION: 3})
    assert len(list(read_uri_list(str(lst), extensions="any"))) == 4


def test_inventory_report(s3):
    rows = [Row(f"mix/{k}", 10, f"e{i}") for i, k in enumerate(ALL)] + [Row("mix/folder/", 0, "d")]
    uri = put_inventory(s3, source_bucket="src", rows=rows, files=2)
    st, f = InventoryStats(), ExtensionFilter()
    assert _rel(iter_inventory(uri, stats=st, extensions=f), "s3://src/mix/") == IMAGES
    assert f.skipped == SKIPPED_BY_DEFAULT and st.not_images == sum(SKIPPED_BY_DEFAULT.values()) + 1
    st, f = InventoryStats(), ExtensionFilter.of("any")
    assert _rel(iter_inventory(uri, stats=st, extensions=f), "s3://src/mix/") == sorted(ALL)
    assert f.total_skipped == 0 and st.not_images == 1     # the folder marker only


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("value,why", [("", "give 'any'"), ("jpg,,png", "empty extension"),
                                       ("any,jpg", "stands alone"), ("tar.gz", "not a file extension")])
def test_submit_refuses_a_bad_extensions_value_before_anything_exists(env, redis_url, tree, tmp_path, value, why):
    out = tmp_path / "out"
    out.mkdir()
    p = cli(["submit", str(tree), "--out", str(out), "--extensions", value], env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--extensions" in lines[0] and why in lines[0] and "Traceback" not in p.stderr
    assert list(redis.Redis.from_url(redis_url).scan_iter("*")) == [] and list(out.iterdir()) == []


def test_submit_of_non_images_says_what_was_skipped(env, redis_url, tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for n in ("a.txt", "b.txt", "blob"):
        (src / n).write_bytes(b"x")
    p = cli(["submit", str(src)], env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = p.stderr.strip().splitlines()[-1]
    assert "no images found" in line and "skipped 3 objects by extension" in line and ".txt 2" in line
    assert "--extensions any" in line
    assert list(redis.Redis.from_url(redis_url).scan_iter("*")) == []


def test_classify_labels_a_heic_made_with_pillow_heif(env, tmp_path):
    d = tmp_path / "phone"
    d.mkdir()
    (d / "IMG_0001.HEIC").write_bytes(heic_bytes())
    (d / "cat.jpg").write_bytes(image_bytes(1))
    alone = tmp_path / "IMG_0002.heic"
    alone.write_bytes(heic_bytes())
    p = cli(["classify", str(d), str(alone), "--model", "hardnet39ds", "--weights", "random", "--device", "cpu",
             "--json"], env, timeout=180)
    assert p.returncode == 0, p.stderr
    recs = {r["uri"].rsplit("/", 1)[-1]: r for r in read_jsonl(p.stdout)}
    assert set(recs) == {"IMG_0001.HEIC", "cat.jpg", "IMG_0002.heic"}
    for r in recs.values():
        assert r["status"] == "ok" and len(r["top5"]) == 5, r
