"""Where does one MS-Resampler query look? `ms-llava visualize`, and the picture `ms-llava demo` draws.

`query_attention` runs the vision tower and MS-Resampler on one image as `generate` does (`get_image_features`) and
returns, for one query, each branch's attention over the token grid (heads averaged), its scope window (where Eq. 5's
B is 0, from `build_scope_bias`) and the mass inside it. `render` draws the input, then per branch the image the model
saw with the anchor, the k x k window and the attention as heat (Pillow); `visualize` writes that as a PNG.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .images import display_rgb
from .modeling_ms_llava import build_scope_bias, query_anchors
from .outputs import check_writable, writing

# Heat colours (magma-like), from no attention to the panel's maximum.
_HEAT_STOPS = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]])


@dataclass
class BranchAttention:
    """One branch's view of the query."""

    window: int  # k
    attention: np.ndarray  # (H, W) float32: the query's attention over the grid tokens, heads averaged
    window_mask: np.ndarray  # (H, W) bool: where B == 0 for this query (its k x k window, clipped to the grid)
    window_tokens: tuple[int, int, int, int]  # (top, left, bottom, right), inclusive token rows / columns
    window_pixels: tuple[int, int, int, int]  # (left, top, right, bottom) in the model's input pixels, exclusive end
    mass_inside: float  # attention on the window's tokens (of 1)
    prefix_mass: float  # attention on tokens off the grid (CLS with vision_feature_select_strategy="full")


@dataclass
class QueryAttention:
    """What `query_attention` found for one query of one image."""

    query: int
    num_queries: int
    query_grid: tuple[int, int]
    anchor: tuple[float, float]  # (y, x) in token-index coordinates, as `query_anchors` gives it
    grid_size: tuple[int, int]  # (H, W) visual-token grid
    patch_size: tuple[int, int]  # (height, width) of a patch in the model's input pixels
    scope_bias_strength: float  # beta
    learned_scope_bias: bool  # B is learned (the windows drawn are Eq. 5's, where it started)
    num_prefix_tokens: int
    model_image: Image.Image  # the pre-processed image the model saw (padded, resized, cropped), de-normalised
    branches: list[BranchAttention]
    point: tuple[float, float] | None  # `query_at` mapped into the model's input pixels, (x, y)


def map_to_model_input(image_processor, image_size: tuple[int, int], point: tuple[float, float]):
    """The point `(x, y)` of the original image in the model's input pixels, following the image processor's steps
    (pad to a centred square, resize the shortest edge or to height x width, centre crop); None when cropped away."""
    (x, y), (width, height) = map(float, point), image_size
    if getattr(image_processor, "do_pad", False) and width != height:
        side = max(width, height)
        x, y, width, height = x + (side - width) // 2, y + (side - height) // 2, side, side
    if getattr(image_processor, "do_resize", False):
        size, short = dict(image_processor.size), min(width, height)
        if size.get("shortest_edge"):
            edge = size["shortest_edge"]
            new = (edge, int(edge * height / short)) if width <= height else (int(edge * width / short), edge)
        else:
            new = (size["width"], size["height"])
        x, y, width, height = x * new[0] / width, y * new[1] / height, *new
    if getattr(image_processor, "do_center_crop", False):
        crop = dict(image_processor.crop_size)
        x, y = x - (width - crop["width"]) // 2, y - (height - crop["height"]) // 2
        width, height = crop["width"], crop["height"]
    return (x, y) if 0 <= x < width and 0 <= y < height else None


def nearest_query(anchors: torch.Tensor, token_yx: tuple[float, float]) -> int:
    """Index of the anchor nearest `token_yx` (token-index coordinates); the lowest index among ties."""
    distance = (anchors - torch.tensor(token_yx, dtype=anchors.dtype)).pow(2).sum(-1)
    return int(torch.nonzero(distance == distance.min())[0, 0])


def _de_normalise(pixel_values: torch.Tensor, image_processor) -> Image.Image:
    """The model's input `(3, h, w)` back to an 8-bit picture (undoing normalisation and rescaling)."""
    array = pixel_values.detach().float().cpu().numpy().transpose(1, 2, 0)
    if getattr(image_processor, "do_normalize", False):
        array = array * np.asarray(image_processor.image_std) + np.asarray(image_processor.image_mean)
    if getattr(image_processor, "do_rescale", False):
        array = array / image_processor.rescale_factor
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="RGB")


@torch.no_grad()
def query_attention(model, processor, image, query=None, query_at=None, **vision_kwargs) -> QueryAttention:
    """Per-branch attention of one MS-Resampler query of `model` (an MS-LLaVA, also one loaded as remote code) on the
    PIL `image`: the query `query` (0 <= query < M, row-major), or the one whose anchor is nearest the point
    `query_at` (x, y) of `image`, or the one nearest the grid's centre. `vision_kwargs` go to the vision tower. The
    resampler is called again on the very inputs `get_image_features` gave it, with `output_attentions=True`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "ms_llava":
        raise ValueError(f"expected an MS-LLaVA model, got {type(model).__name__} with model_type {model_type!r}")
    projector = model.model.multi_modal_projector
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if query is not None and query_at is not None:
        raise ValueError(f"give query or query_at, not both (got query={query!r}, query_at={query_at!r})")
    num_queries = projector.num_queries
    if query is not None and (isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < num_queries):
        raise ValueError(f"query must be an integer in [0, {num_queries}) (M = {num_queries}), got {query!r}")

    image_processor = getattr(processor, "image_processor", processor)
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)

    captured = {}  # what get_image_features passes the resampler
    hook = projector.register_forward_hook(
        lambda _, args, kwargs, out: captured.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    try:
        model.get_image_features(pixel_values=pixel_values, **vision_kwargs)
    finally:
        hook.remove()
    _, probs = projector(*captured["args"], **{**captured["kwargs"], "output_attentions": True})  # (1, E, h, M, N)

    patch = model.config.vision_config.patch_size
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])  # (H, W) visual tokens
    num_prefix = probs.shape[-1] - math.prod(grid)
    rows, cols = projector.config.query_grid_shape
    anchors = query_anchors(rows, cols, *grid)  # (M, 2)

    point = None
    if query_at is not None:
        point = map_to_model_input(image_processor, image.size, query_at)
        if point is None:
            raise ValueError(
                f"query_at {tuple(query_at)} lies outside the part of the {image.size[0]}x"
                f"{image.size[1]} image that the model sees"
            )
        query = nearest_query(anchors, (point[1] / patch[0] - 0.5, point[0] / patch[1] - 0.5))
    elif query is None:
        query = nearest_query(anchors, tuple((side - 1) / 2 for side in grid))

    windows = projector.config.scope_windows
    bias = build_scope_bias(windows, rows, cols, *grid)  # (E, M, H*W), 0 / -1
    attention = probs[0].float().mean(dim=1)[:, query]  # (E, prefix + H*W), heads averaged
    branches = []
    for branch, window in enumerate(windows):
        mask = (bias[branch, query] == 0).view(*grid).numpy()
        grid_attention = attention[branch, num_prefix:].view(*grid).cpu().numpy()
        (top, bottom), (left, right) = ((int(i.min()), int(i.max())) for i in np.nonzero(mask))
        pixels = (left * patch[1], top * patch[0], (right + 1) * patch[1], (bottom + 1) * patch[0])
        masses = float(grid_attention[mask].sum()), float(attention[branch, :num_prefix].sum())
        box = (top, left, bottom, right)
        branches.append(BranchAttention(int(window), grid_attention.astype(np.float32), mask, box, pixels, *masses))
    anchor, learned = (float(anchors[query, 0]), float(anchors[query, 1])), projector.native_grid is not None
    beta, model_image = projector.config.scope_bias_strength, _de_normalise(pixel_values[0], image_processor)
    return QueryAttention(
        query, num_queries, (rows, cols), anchor, grid, patch, beta, learned, num_prefix, model_image, branches, point
    )


MARGIN, HEADER, CAPTION_LINE, CAPTION_LINES = 8, 22, 15, 3


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def panel_layout(num_branches: int, panel_size: int, num_notes: int = 0) -> tuple[int, int]:
    """`(width, height)` of the picture `render` draws: the input panel and one panel per branch, side by side."""
    width = (num_branches + 1) * panel_size + (num_branches + 2) * MARGIN
    height = HEADER * (1 + num_notes) + panel_size + CAPTION_LINES * CAPTION_LINE + 2 * MARGIN
    return width, height


def _branch_panel(result: QueryAttention, branch: BranchAttention, panel_size: int) -> Image.Image:
    panel = result.model_image.resize((panel_size, panel_size), Image.Resampling.BICUBIC)
    peak = float(branch.attention.max())
    normalised = branch.attention / peak if peak > 0 else branch.attention
    stops = np.linspace(0, 1, len(_HEAT_STOPS))  # the heat over the image, 15% (no attention) to 75% opaque
    rgba = [np.interp(normalised, stops, _HEAT_STOPS[:, c]) for c in range(3)] + [255 * (0.15 + 0.6 * normalised)]
    heat = Image.fromarray(np.rint(np.stack(rgba, axis=-1)).astype(np.uint8)).resize(panel.size, Image.NEAREST)
    panel.paste(heat, mask=heat)
    draw = ImageDraw.Draw(panel)
    scale_x, scale_y = (panel_size / side for side in result.model_image.size)
    left, top, right, bottom = branch.window_pixels
    draw.rectangle(
        (left * scale_x, top * scale_y, right * scale_x - 1, bottom * scale_y - 1), outline=(0, 230, 255), width=2
    )
    # the anchor in the model's input pixels: token (y, x) is centred at ((x + 0.5) * patch, (y + 0.5) * patch)
    cx = (result.anchor[1] + 0.5) * result.patch_size[1] * scale_x
    cy = (result.anchor[0] + 0.5) * result.patch_size[0] * scale_y
    r = max(3, panel_size // 60)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255), outline=(0, 0, 0), width=1)
    if result.point is not None:  # the point asked for with query_at
        px, py = result.point[0] * scale_x, result.point[1] * scale_y
        draw.line((px - 2 * r, py, px + 2 * r, py), fill=(255, 40, 40), width=2)
        draw.line((px, py - 2 * r, px, py + 2 * r), fill=(255, 40, 40), width=2)
    return panel


def render(result: QueryAttention, image: Image.Image, panel_size: int = 320, notes=()) -> Image.Image:
    """Draws `result` (from `query_attention` on `image`): the input image, then a panel per branch; `notes` are
    header lines under the one naming the query (a question and answer; characters the font cannot show, such as an
    untrained model's bytes, drawn as '?')."""
    if isinstance(panel_size, bool) or not isinstance(panel_size, int) or panel_size < 64:
        raise ValueError(f"panel_size must be an integer >= 64, got {panel_size!r}")
    canvas = Image.new("RGB", panel_layout(len(result.branches), panel_size, len(notes)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    (grid_h, grid_w), (rows, cols) = result.grid_size, result.query_grid
    heading = (
        f"MS-Resampler query {result.query} of M={result.num_queries} ({rows}x{cols} query grid), anchor "
        f"(row {result.anchor[0]:g}, col {result.anchor[1]:g}) on the {grid_h}x{grid_w} token grid"
    )
    for line, text in enumerate([heading, *notes]):
        text = "".join(c if c.isprintable() else "?" for c in text)
        draw.text((MARGIN, 4 + line * HEADER), text, fill=(0, 0, 0), font=font)
    top = HEADER * (1 + len(notes)) + MARGIN

    # Panel 0: the image as given, fitted into the panel.
    fit = panel_size / max(image.size)
    shown = display_rgb(image).resize([max(1, round(side * fit)) for side in image.size], Image.Resampling.BICUBIC)
    offset = (MARGIN + (panel_size - shown.size[0]) // 2, top + (panel_size - shown.size[1]) // 2)
    canvas.paste(shown, offset)
    (model_w, model_h), learned = result.model_image.size, " (learned B; Eq.5 windows)" * result.learned_scope_bias
    captions = [
        [
            f"input {image.size[0]}x{image.size[1]}",
            f"model sees {model_w}x{model_h}, patch {result.patch_size[1]}",
            f"beta={result.scope_bias_strength:g}{learned}",
        ]
    ]
    for index, branch in enumerate(result.branches):
        canvas.paste(_branch_panel(result, branch, panel_size), (MARGIN + (index + 1) * (panel_size + MARGIN), top))
        top_row, left_col, bottom_row, right_col = branch.window_tokens
        mass = f"in window {100 * branch.mass_inside:.1f}%, peak {100 * float(branch.attention.max()):.1f}%"
        lines = [
            f"branch {index + 1}: k={branch.window}, window {bottom_row - top_row + 1}x{right_col - left_col + 1} "
            "tokens (Eq. 4)",
            f"rows {top_row}-{bottom_row}, cols {left_col}-{right_col}",
            mass + (f", CLS {100 * branch.prefix_mass:.1f}%" if result.num_prefix_tokens else ""),
        ]
        captions.append(lines)
    for index, lines in enumerate(captions):
        x = MARGIN + index * (panel_size + MARGIN)
        for line_index, line in enumerate(lines):
            draw.text((x, top + panel_size + 3 + line_index * CAPTION_LINE), line, fill=(0, 0, 0), font=small)
    return canvas


def visualize(model, processor, image, output, query=None, query_at=None, panel_size=320, notes=()) -> QueryAttention:
    """`query_attention` + `render`, written to the PNG `output`. Returns the `QueryAttention`."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {str(output)!r}")
    result = query_attention(model, processor, image, query=query, query_at=query_at)
    picture = render(result, image, panel_size=panel_size, notes=notes)
    with writing(output.parent):  # a full or read-only disk is named with the folder
        output.parent.mkdir(parents=True, exist_ok=True)
        picture.save(output, format="PNG")
    return result


def parse_point(text: str) -> tuple[float, float]:
    """`"x,y"` to `(x, y)`; ValueError naming the text otherwise."""
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected a point as x,y in pixels (e.g. 120,80), got {text!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"expected a finite point x,y, got {text!r}")
    return x, y


def draw_attention(model, processor, image, output, query=None, query_at=None, notes=()) -> QueryAttention:
    """Writes the attention PNG and prints where, for which query, and each branch's mass inside its window. A query
    the checkpoint does not have (`--query`, `--query-at`) is an `argparse.ArgumentError`."""
    try:
        result = visualize(model, processor, image, output, query=query, query_at=query_at, notes=notes)
    except ValueError as error:  # M and the image's extent are known only now
        raise argparse.ArgumentError(None, str(error)) from error
    print(
        f"attention map: {Path(output).resolve()} (query {result.query} of {result.num_queries}, anchor "
        f"row {result.anchor[0]:g} col {result.anchor[1]:g} on the {result.grid_size[0]}x{result.grid_size[1]} grid)"
    )
    for branch in result.branches:
        cls = f", CLS {100 * branch.prefix_mass:.1f}%" if result.num_prefix_tokens else ""
        print(f"  k={branch.window}: {100 * branch.mass_inside:.1f}% of the attention inside the window{cls}")
    return result


def query_options(args: argparse.Namespace) -> dict:
    """`output`, `query` and `query_at` of the parsed arguments, checked before any weights load."""
    if args.image and not Path(args.image).is_file():
        raise argparse.ArgumentError(None, f"--image: no such file: {args.image}")
    if not args.output.lower().endswith(".png"):
        raise argparse.ArgumentError(None, f"--output must be a .png file, got {args.output!r}")
    check_writable(Path(args.output).parent)  # before the weights load
    try:
        query_at = parse_point(args.query_at) if args.query_at is not None else None
    except ValueError as error:
        raise argparse.ArgumentError(None, f"--query-at: {error}") from error
    return {"output": args.output, "query": args.query, "query_at": query_at}


def run(args: argparse.Namespace) -> int:
    """`ms-llava visualize`: draws one query's per-branch attention (answers `--question` first, when given)."""
    from .chat import ask, load_checkpoint, load_demo_samples
    from .images import load_image

    options = query_options(args)
    path, model, processor, generator = load_checkpoint(args.checkpoint)
    image_path = args.image
    if image_path is None:
        samples = load_demo_samples(path)
        if not samples:
            raise argparse.ArgumentError(None, f"--image is required: {path} has no demo_samples.json")
        image_path = samples[0]["image"]
    image = load_image(image_path)
    print(f"image: {image_path} ({image.size[0]}x{image.size[1]})")
    notes = []
    if args.question is not None:
        answer = ask(generator, args.question, args.max_new_tokens, image=image)
        print(f"question: {args.question}\nanswer: {answer!r}")
        notes.append(f"Q: {args.question}   A: {answer}")
    draw_attention(model, processor, image, notes=notes, **options)
    return 0
