"""The image feature extractors of the reference metrics, at the reference layers and sizes.

| extractor | architecture (source)              | features                          | resize        | normalisation |
| alexnet   | AlexNet (torchvision)              | `features.4` (Alex2), `features.11` (Alex5) | 256 bilinear | ImageNet |
| inception | InceptionV3 (torchvision)          | `avgpool` (Incep, FID), `fc` logits (n-way) | 342 bilinear | ImageNet |
| clip      | CLIP ViT-L/14, OpenAI's weights, QuickGELU (open_clip) | image embedding (CLIP) | 224 bilinear | CLIP |
| effnet    | EfficientNet-B1 (torchvision)      | `avgpool` (EffNet-B)              | 255 bilinear  | ImageNet      |
| swav      | ResNet-50, SwAV weights            | `avgpool` (SwAV)                  | 224 bilinear  | ImageNet      |
| vit_h_14  | ViT-H/14, SWAG E2E weights (torchvision) | ImageNet logits (n-way)     | 518 PIL bicubic | ImageNet    |

The first five are MindEye's metric models with its preprocessing (`transforms.Resize` on
float tensors, then `Normalize`): bilinear, and without antialiasing under the default
"reference" resize convention (eval/resize.py). ViT-H/14 is MinD-Vis' n-way classifier
(`ViT_H_14_Weights.DEFAULT`) with its weights' `transforms()`, which resized 8-bit PIL
images: bicubic to 518 (the centre crop is then the whole image).

Weights are read only from local files: by default the file names torch.hub would
download, in the user's hub cache (`$TORCH_HOME/hub/checkpoints`), or a path given per
extractor. A missing file is an error naming it; random weights are built only when
asked for (tests, smoke runs), and such a report says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm import tqdm

from data.clip_weights import read_clip_weights
from data.files import load_tensors
from data.pretrained_weights import WeightsMissing
from eval.resize import resize, resize_like_pil
from models.clip_image import CLIP_MEAN, CLIP_STD, build_visual
from models.strict_load import load_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Spec:
    title: str
    size: int
    interpolation: str  # "bilinear" (a float tensor resize) or "pil-bicubic" (an 8-bit PIL resize)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str  # the file name torch.hub / the `clip` package would download
    outputs: tuple[str, ...]  # feature names this extractor produces


def _url_name(weights: tvm.WeightsEnum) -> str:
    return weights.url.rsplit("/", 1)[-1]


SPECS: dict[str, Spec] = {
    "alexnet": Spec("AlexNet", 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD,
                    _url_name(tvm.AlexNet_Weights.IMAGENET1K_V1), ("alexnet2", "alexnet5")),
    "inception": Spec("InceptionV3", 342, "bilinear", IMAGENET_MEAN, IMAGENET_STD,
                      _url_name(tvm.Inception_V3_Weights.IMAGENET1K_V1), ("inception", "inception_logits")),
    "clip": Spec("CLIP ViT-L/14", 224, "bilinear", CLIP_MEAN, CLIP_STD, "ViT-L-14.pt", ("clip",)),
    "effnet": Spec("EfficientNet-B1", 255, "bilinear", IMAGENET_MEAN, IMAGENET_STD,
                   _url_name(tvm.EfficientNet_B1_Weights.IMAGENET1K_V2), ("effnet",)),
    "swav": Spec("SwAV ResNet-50", 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "swav_800ep_pretrain.pth.tar", ("swav",)),
    "vit_h_14": Spec("ViT-H/14", 518, "pil-bicubic", IMAGENET_MEAN, IMAGENET_STD,
                     _url_name(tvm.ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1), ("vit_h_14_logits",)),
}


def default_weights_dirs() -> list[Path]:
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    return dirs + [Path(os.path.expanduser("~/.cache/clip"))]


def locate_weights(name: str, given: str | None = None, search: list[Path] | None = None) -> Path:
    """The weight file of extractor `name`: `given` if set, else its default file name in the search folders."""
    spec = SPECS[name]
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"{path}: {spec.title} weights not found (--weights {name}=PATH)")
        return path
    folders = search if search is not None else default_weights_dirs()
    for folder in folders:
        if (folder / spec.weights_file).is_file():
            return folder / spec.weights_file
    where = " or ".join(str(f / spec.weights_file) for f in folders)
    raise WeightsMissing(f"{where}: {spec.title} weights not found (put the file there, or pass --weights {name}=PATH)")


class CLIPEmbedding(nn.Module):
    """The CLIP metric's features: OpenAI's `encode_image` (the pooled image embedding, not normalised)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"clip": self.visual(x)}


def load_clip_visual(path: Path, visual: nn.Module) -> nn.Module:
    """`visual` (an open_clip ViT built with QuickGELU) holding the image tower of the CLIP
    weights file `path` (any format of data/clip_weights.py). The metric is defined with
    OpenAI's CLIP, so a file that says it uses GELU is refused; a bare state dict is taken to be
    OpenAI's."""
    weights = read_clip_weights(path, WeightsMissing, "--weights clip=PATH")
    if weights.quick_gelu is False:
        raise WeightsMissing(f"{path}: {weights.says} says gelu: not OpenAI's CLIP, which the CLIP metric uses "
                             "(--weights clip=PATH)")
    try:
        load_strict(visual, weights.state, "visual.")
    except ValueError as e:
        raise WeightsMissing(f"{path}: not OpenAI's CLIP ViT-L/14 ({e}) (--weights clip=PATH)") from None
    return visual


def _load(model: nn.Module, path: Path, title: str, drop_prefix: str = "", allow_missing: tuple[str, ...] = ()) -> None:
    state = load_tensors(path, WeightsMissing, f"not a readable {title} checkpoint")
    state = state.get("state_dict", state)
    own = model.state_dict()
    state = {k.removeprefix(drop_prefix): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    if missing:
        raise WeightsMissing(f"{path}: not a {title} checkpoint (missing {missing[0]} and {len(missing) - 1} more)")
    model.load_state_dict(state, strict=False)


def build_extractor(name: str, weights: Path | str) -> nn.Module:
    """Extractor `name` as a module mapping normalised images to {feature name: tensor}.

    `weights` is a local file, or "random" for a seeded random initialisation (tests only).
    """
    if name not in SPECS:
        raise ValueError(f"unknown feature extractor {name!r}; known: {', '.join(SPECS)}")
    random = weights == "random"
    title = SPECS[name].title
    if name == "clip":  # OpenAI's ViT-L/14, trained with QuickGELU
        visual = build_visual("ViT-L-14", quick_gelu=True)
        return CLIPEmbedding(visual if random else load_clip_visual(Path(weights), visual)).eval()
    if name == "alexnet":
        net, nodes, prefix, missing = tvm.alexnet(), {"features.4": "alexnet2", "features.11": "alexnet5"}, "", ()
    elif name == "inception":
        net = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=random)
        nodes, prefix, missing = {"avgpool": "inception", "fc": "inception_logits"}, "", ()
    elif name == "effnet":
        net, nodes, prefix, missing = tvm.efficientnet_b1(), {"avgpool": "effnet"}, "", ()
    elif name == "vit_h_14":  # the SWAG E2E weights are for 518 x 518 inputs
        net, nodes, prefix, missing = tvm.vit_h_14(image_size=SPECS[name].size), {"heads": "vit_h_14_logits"}, "", ()
    else:  # swav: a ResNet-50 trunk; the SwAV file has no ImageNet classifier
        net, nodes, prefix, missing = tvm.resnet50(), {"avgpool": "swav"}, "module.", ("fc.",)
    if not random:
        _load(net, Path(weights), title, prefix, missing)
    return create_feature_extractor(net.eval(), return_nodes=nodes, suppress_diff_warning=True).eval()


def preprocess(images: torch.Tensor, spec: Spec, convention: str = "reference") -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> resized to spec.size x spec.size (a float resize in the
    given convention, or PIL's 8-bit one) and normalised."""
    if spec.interpolation == "pil-bicubic":
        x = resize_like_pil(images, spec.size)
    else:
        x = resize(images, spec.size, spec.interpolation, convention)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def extract(images: torch.Tensor, extractors: dict[str, nn.Module], device: torch.device, batch_size: int = 64,
            desc: str = "features", convention: str = "reference") -> dict[str, torch.Tensor]:
    """Every extractor's features for `images` (float [N, 3, H, W] in [0, 1]), one pass each.

    Each model visits the device only for its own pass. Float32 throughout, TF32 off, so
    CPU and GPU agree to float tolerance. Returns {feature name: float32 [N, ...] on CPU}.
    """
    out: dict[str, list[torch.Tensor]] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        total = len(extractors) * len(images)
        with tqdm(total=total, desc=desc, unit="img", mininterval=2) as bar:
            for name, model in extractors.items():
                model.to(device)
                for start in range(0, len(images), batch_size):
                    batch = images[start : start + batch_size].to(device, torch.float32, non_blocking=True)
                    for key, value in model(preprocess(batch, SPECS[name], convention)).items():
                        out.setdefault(key, []).append(value.float().cpu())
                    bar.update(len(batch))
                model.to("cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {k: torch.cat(v) for k, v in out.items()}
