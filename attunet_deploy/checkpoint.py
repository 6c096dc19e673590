"""Read Attention U-Net checkpoints in every supported layout; write this project's format.

Supported inputs (docs/design.md section 2):

1. this project's file ``{"format": "attunet-deploy/1", "config": {...}, "state_dict": {...}}``;
2. a bare state_dict of the popular ``AttU_Net`` code (``Conv1.conv.0.weight``,
   ``Att5.W_g.0.weight``, ``Up5.up.1.weight``, head ``Conv.*`` or ``Conv_1x1.*``), possibly
   with ``module.`` prefixes and inside ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers;
3. TorchScript archives, used as they are;
4. full pickled modules, only with ``trust_pickle=True`` because unpickling runs code.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from attunet_deploy.errors import CheckpointError
from attunet_deploy.fileio import atomic_path
from attunet_deploy.models.attunet2d import AttentionUNet, AttentionUNetConfig

FORMAT = "attunet-deploy/1"

#: Wrapper keys that training scripts put around a state_dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
#: Prefixes added by DataParallel / DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
#: Top-level renames from the popular AttU_Net naming to this project's modules.
_RENAMES = (
    (re.compile(r"^Up_conv([2-5])\."), r"dec\1."),
    (re.compile(r"^Conv([1-5])\."), r"enc\1."),
    (re.compile(r"^Up([2-5])\."), r"up\1."),
    (re.compile(r"^Att([2-5])\."), r"att\1."),
    (re.compile(r"^(?:Conv_1x1|Conv|final)\."), "head."),
)
_SHOW = 5  # how many keys of each kind an error lists


#: Model families (models/): the popular 2D AttU_Net, the paper's 3D networks, MONAI's AttentionUnet.
FAMILIES = ("attunet2d", "oktay3d", "monai")


@dataclass
class LoadedCheckpoint:
    """A model ready for export: one of our families (weights can be re-saved in our format) or an
    opaque module (TorchScript, a foreign pickled module) exported as it is."""

    module: nn.Module
    config: Any  # AttentionUNetConfig | Oktay3DConfig | MonaiConfig: each has in_channels, out_channels
    source: str  # "attunet-deploy" | "state_dict" | "torchscript" | "pickle"
    notes: list[str] = field(default_factory=list)
    family: str = "attunet2d"

    @property
    def is_reference(self) -> bool:
        """True when ``module`` is one of this project's family modules (weights can be re-saved)."""
        return isinstance(self.module, AttentionUNet) or getattr(self.module, "family", None) in FAMILIES[1:]


def save_checkpoint(model: nn.Module, path: str | Path, meta: Mapping[str, str] | None = None) -> None:
    """Write a family module in this project's checkpoint format (atomically). 3D families keep
    their original networks' state_dict keys (the authors' or MONAI's)."""
    family = "attunet2d" if isinstance(model, AttentionUNet) else str(getattr(model, "family", ""))
    if family not in FAMILIES:
        raise CheckpointError(f"cannot save a {type(model).__name__}: not one of {', '.join(FAMILIES)}")
    net: Any = model if family == "attunet2d" else model.net  # 3D families: their original networks' keys
    state = net.state_dict()
    config: Any = model.config
    payload = {
        "format": FORMAT,
        "family": family,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "meta": {str(k): str(v) for k, v in (meta or {}).items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, trust_pickle: bool = False, arch: str | None = None,
                    monai_args: str | None = None) -> LoadedCheckpoint:
    """Read ``path`` in any supported layout and return an eval-mode CPU model. The family is read
    from the state_dict's keys; ``arch`` (attunet2d | oktay3d | monai) overrides that, and
    ``monai_args`` gives MONAI arguments the weights do not show (``"strides=2,2,1"``)."""
    if arch is not None and arch not in FAMILIES:
        raise CheckpointError(f"--arch {arch!r}: choose one of {', '.join(FAMILIES)}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    _check_bounded(path)
    _sniff(path)

    if _is_torchscript(path):
        return _load_torchscript(path)

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _needs_full_pickle(exc):
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({_first_line(exc)})") from exc
        if not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects (e.g. a whole nn.Module); loading it runs code. "
                "Save a state_dict instead, or rerun with --trust-pickle if you trust the file."
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:
            raise CheckpointError(f"cannot unpickle {path}: {_first_line(inner)}") from inner
        return _from_object(obj, source="pickle", arch=arch, monai_args=monai_args)
    except MemoryError:
        raise
    except Exception as exc:  # weights_only unpickling: any failure of a damaged or foreign file lands here
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from exc
    return _from_object(obj, source="state_dict", arch=arch, monai_args=monai_args)


def _sniff(path: Path) -> None:
    """Refuse a file that is no torch.save format at all before torch's C++ readers parse it:
    a zip archive (torch >= 1.6, TorchScript), a pickle (legacy torch.save) or a tar (torch < 0.4)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(264)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) \
            or head[257:262] == b"ustar":
        return
    raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: it is neither a torch.save archive nor a "
                          "pickle (wrong file, or damaged)")


#: A zip checkpoint may inflate at most this many times its size once past INFLATE_FLOOR bytes.
INFLATE_RATIO = 8
INFLATE_FLOOR = 64 << 20


def _check_bounded(path: Path) -> None:
    """Refuse special files and checkpoints (or zip members) above the size limit before torch.load."""
    from attunet_deploy import limits
    from attunet_deploy.errors import InputError

    try:
        size = limits.check_file_size(path, limits.CHECKPOINT, "checkpoint")
    except InputError as exc:
        raise CheckpointError(str(exc)) from None
    cap = limits.CHECKPOINT.bytes()
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                unpacked = sum(i.file_size for i in zf.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({_first_line(exc)})") from exc
        if unpacked > cap:
            raise CheckpointError(str(limits.too_large(f"{path} (unpacked)", unpacked, limits.CHECKPOINT)))
        # torch.save writes its archive uncompressed (ZIP_STORED); a small file that inflates many times
        # over is a decompression bomb, refused before torch.load holds the inflated bytes in memory.
        if unpacked > INFLATE_FLOOR and unpacked > INFLATE_RATIO * max(size, 1):
            raise CheckpointError(f"{path} is {size / 2**20:,.1f} MB but inflates to {unpacked / 2**20:,.0f} MB: "
                                  "torch.save writes uncompressed archives; save the checkpoint again with torch.save")


def load_checkpoint_bytes(data: bytes, name: str) -> LoadedCheckpoint:
    """This project's own checkpoint from bytes already hash-checked (the bundle's weights.pt)."""
    import io

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {name} as a PyTorch checkpoint ({_first_line(exc)})") from exc
    return _from_object(obj, source="state_dict")


def _from_object(obj: Any, source: str, arch: str | None = None, monai_args: str | None = None) -> LoadedCheckpoint:
    if isinstance(obj, nn.Module):
        return _from_module(obj, source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint holds a {type(obj).__name__}, expected a state_dict (a dict of tensors)"
        )
    if obj.get("format") == FORMAT and obj.get("family", "attunet2d") != "attunet2d":
        state = obj.get("state_dict")
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError("attunet-deploy checkpoint's state_dict is not a mapping of names to tensors")
        return load_family(str(obj["family"]), dict(state), "attunet-deploy", config=obj.get("config"))
    if obj.get("format") == FORMAT:
        try:
            config = AttentionUNetConfig.from_dict(obj["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"attunet-deploy checkpoint has a bad config: {exc}") from exc
        state = obj.get("state_dict")
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"attunet-deploy checkpoint's state_dict is a {type(state).__name__}, expected a "
                                  "mapping of names to tensors")
        model = build_model(state, config)
        return LoadedCheckpoint(model, config, "attunet-deploy")
    state_dict = unwrap_state_dict(obj)
    if isinstance(state_dict, nn.Module):
        return _from_module(state_dict, source)
    stripped = strip_prefixes(state_dict)
    family = arch or detect_family(set(stripped))
    if family != "attunet2d":
        return load_family(family, stripped, source, monai_args=monai_args)
    renamed = convert_state_dict(state_dict)
    config = infer_config(renamed)
    model = build_model(renamed, config)
    return LoadedCheckpoint(model, config, source)


def _from_module(module: nn.Module, source: str) -> LoadedCheckpoint:
    if isinstance(module, AttentionUNet):
        return LoadedCheckpoint(module.eval(), module.config, source)
    # A pickled AttU_Net of the popular code: its state_dict maps onto ours.
    try:
        renamed = convert_state_dict(module.state_dict())
        config = infer_config(renamed)
        return LoadedCheckpoint(build_model(renamed, config), config, source,
                                [f"weights taken from a pickled {type(module).__name__}"])
    except CheckpointError:
        config = _probe_config(module)
        return LoadedCheckpoint(module.eval(), config, source,
                                [f"{type(module).__name__} exported as it is (not an AttU_Net layout)"])


def unwrap_state_dict(obj: Mapping[str, Any]) -> Any:
    """Peel training-script wrappers (``{"epoch": .., "state_dict": ..}``) off a state_dict."""
    for _ in range(4):  # nested wrappers like {"model": {"state_dict": ...}} exist in the wild
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, nn.Module)):
                obj = obj[key]
                break
        else:
            break
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(list(map(str, obj.keys()))[:_SHOW]) if isinstance(obj, Mapping) else ""
        raise CheckpointError(f"no state_dict found in checkpoint (top-level keys: {keys or 'none'})")
    return obj


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and rename popular AttU_Net keys to this project's names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        for pattern, repl in _RENAMES:
            key, n = pattern.subn(repl, key)
            if n:
                break
        out[key] = value
    return out


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> AttentionUNetConfig:
    """Read in/out/base channels off the first conv and the head of a (renamed) state_dict."""
    first, head = state_dict.get("enc1.conv.0.weight"), state_dict.get("head.weight")
    if first is None or head is None or first.ndim != 4 or head.ndim != 4:
        _raise_mismatch(state_dict, AttentionUNet(AttentionUNetConfig(1, 1, 4)), None)
    return AttentionUNetConfig(in_channels=int(first.shape[1]), out_channels=int(head.shape[0]),
                               base_channels=int(first.shape[0]))


def check_model_size(config: AttentionUNetConfig) -> int:
    """Parameters the config implies, counted on the meta device (nothing allocated); a model whose
    weights would not fit the checkpoint limit is refused before it is built."""
    from attunet_deploy import limits

    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in AttentionUNet(config).parameters())
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint implies an impossible model ({config}): {_first_line(exc)}") from exc
    if params * 4 > limits.CHECKPOINT.bytes():
        raise CheckpointError(f"checkpoint's tensor shapes imply a model of {params:,} parameters "
                              f"({params * 4 / 2**30:,.1f} GiB; in {config.in_channels}, out {config.out_channels}, "
                              f"base {config.base_channels}), above the {limits.CHECKPOINT.what} limit of "
                              f"{limits.CHECKPOINT.describe()}: set {limits.CHECKPOINT.env} if it is real")
    return params


def state_mismatch(expected: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]
                   ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, shape mismatches) of ``state`` against a model's own state_dict.
    BatchNorm step counters the state lacks are filled in (they do not affect inference; older
    exports lack them)."""
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def build_model(state_dict: Mapping[str, torch.Tensor], config: AttentionUNetConfig) -> AttentionUNet:
    """An eval-mode AttentionUNet with ``state_dict`` loaded; a readable error on mismatch."""
    check_model_size(config)
    model = AttentionUNet(config)
    state = dict(state_dict)
    if any(state_mismatch(model.state_dict(), state)):
        _raise_mismatch(state, model, config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _raise_mismatch(state: Mapping[str, torch.Tensor], model: AttentionUNet,
                    config: AttentionUNetConfig | None) -> NoReturn:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}" for k, v in expected.items()
              if k in state and config is not None and tuple(state[k].shape) != tuple(v.shape)]

    def few(items: list[str]) -> str:
        more = f", +{len(items) - _SHOW} more" if len(items) > _SHOW else ""
        return ", ".join(items[:_SHOW]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({few(shapes)})")
    raise CheckpointError(
        "checkpoint does not match the Attention U-Net (AttU_Net layout): " + "; ".join(parts)
        + ". Pass an AttU_Net state_dict, an attunet-deploy checkpoint or a TorchScript file."
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    # torch.save archives hold data.pkl only; TorchScript adds constants.pkl and code/.
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _load_torchscript(path: Path) -> LoadedCheckpoint:
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise CheckpointError(f"cannot load TorchScript archive {path}: {_first_line(exc)}") from exc
    return LoadedCheckpoint(module, _probe_config(module), "torchscript",
                            ["TorchScript archive exported as it is"])


def _probe_config(module: nn.Module) -> AttentionUNetConfig:
    """Config of an opaque module: in/base from its first 4D weight, out from a probe forward."""
    weights = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor) and t.ndim == 4]
    if not weights:
        raise CheckpointError("cannot tell the model's input channels: it has no conv weights")
    in_ch, base = int(weights[0].shape[1]), int(weights[0].shape[0])
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, in_ch, 32, 32))
    except Exception as exc:
        raise CheckpointError(f"the model does not run on a 1x{in_ch}x32x32 input: {_first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or tuple(out.shape[2:]) != (32, 32):
        raise CheckpointError("the model must return one [N, K, H, W] logits tensor of the input's size")
    return AttentionUNetConfig(in_channels=in_ch, out_channels=int(out.shape[1]), base_channels=base)


def _needs_full_pickle(exc: Exception) -> bool:
    # torch names the class it refused ("Unsupported global: GLOBAL pkg.Cls"); garbage bytes
    # fail with other unpickler errors ("Unsupported operand ...") and are not pickled objects.
    text = str(exc)
    return "Unsupported global" in text or "GLOBAL " in text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict without DataParallel / torch.compile prefixes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            for prefix in _PREFIXES:
                while key.startswith(prefix):
                    key = key[len(prefix):]
            out[key] = value
    return out


def detect_family(keys: set[str]) -> str:
    """The model family a state_dict's keys belong to (the 2D AttU_Net unless they say otherwise)."""
    from attunet_deploy.models.monai import is_monai_attention_unet
    from attunet_deploy.models.oktay3d import variant_of

    if variant_of(keys) is not None:
        return "oktay3d"
    if is_monai_attention_unet(keys):
        return "monai"
    return "attunet2d"


def load_family(family: str, state: dict[str, torch.Tensor], source: str, *, config: Any = None,
                monai_args: str | None = None) -> LoadedCheckpoint:
    """A 3D (or MONAI) family module with ``state`` loaded: the config from ``config`` (our own
    checkpoints) or read off the tensor shapes; CheckpointError names what does not fit."""
    cfg: Any
    module: Any
    try:
        if family == "oktay3d":
            from attunet_deploy.models import oktay3d

            variant = oktay3d.variant_of(set(state))
            if config is None and variant is None:
                raise CheckpointError("checkpoint is not one of the authors' 3D networks (unet_CT_multi_att_dsv_3D, "
                                      "unet_grid_attention_3D): their keys conv1.conv1.0.weight, gating.*, final.* "
                                      "are missing")
            cfg = oktay3d.Oktay3DConfig.from_dict(config) if config is not None else \
                oktay3d.infer_config(state, str(variant))
            module = oktay3d.Oktay3D(cfg)
        elif family == "monai":
            from attunet_deploy.models import monai

            cfg = monai.MonaiConfig.from_dict(config) if config is not None else \
                monai.infer_config(state, monai.parse_monai_args(monai_args))
            module = monai.MonaiAttentionUnet(cfg)
        else:
            raise CheckpointError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read the {family} model's configuration from the checkpoint: "
                              f"{_first_line(exc)}") from exc
    except ImportError as exc:
        raise CheckpointError(str(exc)) from exc
    missing, unexpected, shapes = state_mismatch(module.net.state_dict(), state)
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} ({', '.join(v[:_SHOW])}{', ...' if len(v) > _SHOW else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if v]
        raise CheckpointError(f"checkpoint does not match the {family} model it looks like: " + "; ".join(parts))
    module.net.load_state_dict(state, strict=True)
    return LoadedCheckpoint(module.eval(), cfg, source, family=family)

