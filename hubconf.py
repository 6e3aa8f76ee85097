"""PyTorch Hub entry points for HarDNet: one per variant of the registry (``hnq.models``).

    model = torch.hub.load("<owner>/hardnet-queue", "hardnet68", pretrained=True)
    model = torch.hub.load("/path/to/checkout", "hardnet68", source="local", pretrained=True)

``pretrained=True`` loads the published ImageNet weights (downloaded once into the torch hub
cache), or the file named by the ``HARDNET_WEIGHTS`` environment variable (a path, ``file://``
or ``http(s)://`` URL) when it is set. Pretrained models are returned in eval mode; expected
input: RGB, Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize(mean=[0.485, 0.456, 0.406],
std=[0.229, 0.224, 0.225]) (``worker.model.weights.WEIGHTS[name].preprocess``).

The entry points are made from the registry below, not written out, so that a variant is named
in one place; torch.hub lists every public callable of this module, so nothing else here is public.
"""
dependencies = ["torch"]

from hnq.models import REGISTRY as _REGISTRY  # noqa: E402
from worker.model import WEIGHTS as _WEIGHTS  # noqa: E402
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


def _entry_point(info):
    def entry(pretrained=False, **kwargs):
        return _entry(info.name, pretrained, kwargs)

    published = _WEIGHTS[info.name]
    entry.__name__ = entry.__qualname__ = info.name
    entry.__doc__ = f"""{info.title} ({info.summary}). ImageNet top-1 error {published.top1_error} %,
    top-5 {published.top5_error} %.

    Args:
        pretrained (bool): load the ImageNet weights (HARDNET_WEIGHTS overrides where from).
        num_classes (int): classifier width for an untrained model (default 1000).
    """
    return entry


globals().update({_name: _entry_point(_info) for _name, _info in _REGISTRY.items()})
