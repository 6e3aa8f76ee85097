"""PyTorch Hub entry points for HarDNet.

    model = torch.hub.load("<owner>/hardnet-queue", "hardnet68", pretrained=True)
    model = torch.hub.load("/path/to/checkout", "hardnet68", source="local", pretrained=True)

``pretrained=True`` loads the published ImageNet weights (downloaded once into the torch hub
cache), or the file named by the ``HARDNET_WEIGHTS`` environment variable (a path, ``file://``
or ``http(s)://`` URL) when it is set. Pretrained models are returned in eval mode; expected
input: RGB, Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize(mean=[0.485, 0.456, 0.406],
std=[0.229, 0.224, 0.225]).
"""
dependencies = ["torch"]

from worker.model import build_hardnet as _build_hardnet  # noqa: E402
from worker.model import load_model as _load_model  # noqa: E402
from worker.model import weights_from_env as _weights_from_env  # noqa: E402


def _entry(name, pretrained, kwargs):
    options = dict(kwargs)
    num_classes = options.pop("num_classes", 1000)
    if options:
        raise TypeError(
            f"{name}() got unexpected keyword argument(s) {', '.join(sorted(options))}; "
            "supported: pretrained, num_classes"
        )
    if pretrained:
        if num_classes != 1000:
            raise ValueError(
                f"{name}: the pretrained weights have 1000 ImageNet classes; num_classes={num_classes!r} "
                "needs pretrained=False (then replace or fine-tune the classifier yourself)"
            )
        return _load_model(name, _weights_from_env())
    return _build_hardnet(name, num_classes=num_classes)


def hardnet39ds(pretrained=False, **kwargs):
    """HarDNet-39DS (depthwise-separable; 3.5 M params, 0.43 GMACs). ImageNet top-1 error 27.92 %,
    top-5 9.57 %.

    Args:
        pretrained (bool): load the ImageNet weights (HARDNET_WEIGHTS overrides where from).
        num_classes (int): classifier width for an untrained model (default 1000).
    """
    return _entry("hardnet39ds", pretrained, kwargs)


def hardnet68ds(pretrained=False, **kwargs):
    """HarDNet-68DS (depthwise-separable; 4.2 M params, 0.78 GMACs). ImageNet top-1 error 25.71 %,
    top-5 8.13 %.

    Args:
        pretrained (bool): load the ImageNet weights (HARDNET_WEIGHTS overrides where from).
        num_classes (int): classifier width for an untrained model (default 1000).
    """
    return _entry("hardnet68ds", pretrained, kwargs)


def hardnet68(pretrained=False, **kwargs):
    """HarDNet-68 (17.6 M params, 4.2 GMACs). ImageNet top-1 error 23.52 %, top-5 6.99 %.

    Args:
        pretrained (bool): load the ImageNet weights (HARDNET_WEIGHTS overrides where from).
        num_classes (int): classifier width for an untrained model (default 1000).
    """
    return _entry("hardnet68", pretrained, kwargs)


def hardnet85(pretrained=False, **kwargs):
    """HarDNet-85 (36.7 M params, 9.1 GMACs). ImageNet top-1 error 21.96 %, top-5 6.11 %.

    Args:
        pretrained (bool): load the ImageNet weights (HARDNET_WEIGHTS overrides where from).
        num_classes (int): classifier width for an untrained model (default 1000).
    """
    return _entry("hardnet85", pretrained, kwargs)
