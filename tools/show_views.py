"""Draw the views (and masks) a recipe produces for a few samples, as a PNG grid.

    python tools/show_views.py --method swav --multicrop 2x224+6x96 --out views.png
    python tools/show_views.py --run runs/my-inpainting --out inpainted.png

One row per sample, one column per view (grouped by crop size, in batch order); masked patches of
masked-image recipes are shaded. Views are shown after the full photometric recipe, un-normalised.

`--run RUN` draws a context-encoder run's reconstructions instead (`--method inpainting`): for a few
images of `--data` (default: the demo validation shards), in shard order and at the evaluation crop, the
input with its hole, the prediction pasted into the hole, and the original; from the run's latest
checkpoint (or a checkpoint directory), the method rebuilt from its saved options.

A colorization run's `--run` draws its predicted colours for those images: the lightness input, the
predicted colours (the annealed mean of the predicted distribution at `--temperature`, 0.38 as the paper;
the regressed ab with loss=regression) and the ground truth; a run with grey=false_colour also shows the
false colours its grey images trained on. Without `--run`, `--method colorization` shows the views as
the lightness the backbone sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipelines.shards import DEMO_TRAIN, DEMO_VAL, ShardError  # noqa: E402
from pipelines.spec import RecipeError, eval_recipe, preset  # noqa: E402
from pipelines.stack import Batch, InputStack  # noqa: E402


def displayable(views: torch.Tensor, mean, std, lightness: bool = False) -> torch.Tensor:
    """(N, 3, H, W) normalised views back to [0, 1] images (N, H, W, 3); `lightness`: views of centred
    lightness (L - 50) / 50 (a recipe's `lightness_input`), shown as grey L / 100."""
    if lightness:
        views = views * 0.5 + 0.5
    elif mean is not None:
        views = views * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return views.clamp(0, 1).permute(0, 2, 3, 1)


def shade_masked(images: torch.Tensor, masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Darken and tint the masked patches of (N, H, W, 3) images; masks are (N, patches)."""
    grid = images.shape[1] // patch
    pixel_mask = masks.view(-1, grid, grid).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    tint = torch.tensor([0.1, 0.1, 0.45])
    shaded = images.clone()
    shaded[pixel_mask] = 0.35 * shaded[pixel_mask] + tint
    return shaded


def draw(batch: Batch, recipe, samples: int, out: Path) -> None:
    columns = []  # (title, images (B, H, W, 3))
    for group_index, group in enumerate(recipe.groups):
        for view in range(group.count):
            images = displayable(batch.view(group_index, view).float().cpu(), recipe.mean, recipe.std,
                                 recipe.lightness_input)
            masking = recipe.masking
            if masking is not None and group_index == 0 and view < masking.views:
                view_masks = batch.masks[view * batch.batch_size : (view + 1) * batch.batch_size].cpu()
                images = shade_masked(images, view_masks, masking.patch_size)
            columns.append((f"{group.size}px #{view + 1}", images))
    figure, axes = plt.subplots(
        samples, len(columns), figsize=(1.6 * len(columns), 1.6 * samples), squeeze=False
    )
    keys = batch.keys
    for row in range(samples):
        for column, (title, images) in enumerate(columns):
            axis = axes[row][column]
            axis.imshow(images[row].numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=8)
            if column == 0:
                axis.set_ylabel(keys[row], fontsize=7)
    figure.suptitle(f"{recipe.name} {recipe.multicrop}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


RECONSTRUCTION_COLUMNS = {"input": "input (hole filled)", "inpainted": "prediction in the hole",
                          "original": "original"}


def load_run_method(run: Path):
    """(method in eval mode on the CPU, the recipe it trained on, the checkpoint) from a run directory's
    latest checkpoint or a checkpoint directory: the method built as train.py built it from the saved
    options (head widths of the device it trained on), with the checkpoint's weights (safetensors)."""
    from safetensors.torch import load_file

    from models.checkpointing import list_checkpoints
    from models.methods import create_method
    from models.options import parse_options
    from models.training import Config, resolve

    run = Path(run)
    checkpoint = run if (run / "meta.json").is_file() else (list_checkpoints(run) or [None])[-1]
    if checkpoint is None:
        raise ValueError(f"--run {run}: not a run directory with checkpoints or a checkpoint directory")
    meta = json.loads((checkpoint / "meta.json").read_text())
    known = {field.name for field in dataclasses.fields(Config)}
    saved = Config(**{key: value for key, value in meta["config"].items() if key in known})
    config, recipe, _ = resolve(saved, torch.device("cpu"), world_size=1)
    method = create_method(config.method, backbone=config.backbone, stem=config.stem,
                           on_gpu=meta.get("device") == "cuda",
                           backbone_kwargs=parse_options(config.backbone_options, "--backbone-options"),
                           **parse_options(config.method_options, "--method-options"))
    method.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    return method.eval(), method.adapt_recipe(recipe), checkpoint


def draw_reconstructions(columns: dict[str, torch.Tensor], keys: list[str], recipe, title: str, out: Path) -> None:
    """One row per image, one column per entry of `columns` ((N, 3, S, S), normalised like the views)."""
    shown = [(RECONSTRUCTION_COLUMNS.get(name, name), displayable(images.float().cpu(), recipe.mean, recipe.std))
             for name, images in columns.items()]
    samples = len(keys)
    figure, axes = plt.subplots(samples, len(shown), figsize=(1.8 * len(shown), 1.8 * samples), squeeze=False)
    for row in range(samples):
        for column, (name, images) in enumerate(shown):
            axis = axes[row][column]
            axis.imshow(images[row].numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=8)
            if column == 0:
                axis.set_ylabel(keys[row], fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


@torch.no_grad()
def colour_columns(method, images: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """{title: (N, 3, S, S) pictures in [0, 1]} for RGB `images` (N, 3, S, S) in [0, 1]: the lightness input,
    the colours a colorization `method` predicts from it, the ground truth, and (grey=false_colour) the
    false colours the run's grey images trained on."""
    import kornia

    from models.methods.colorization import false_colour
    from pipelines.pretext import centred_lightness, to_lab

    lab = to_lab(images)
    lightness = lab[:, :1]
    predicted = method.colourise(centred_lightness(lightness), temperature)

    def picture(ab: torch.Tensor) -> torch.Tensor:
        return kornia.color.lab_to_rgb(torch.cat([lightness, ab], dim=1), clip=True)

    head = method.head
    name = f"annealed mean T={temperature:g}" if head.loss == "classification" else "regressed ab"
    columns = {"L input": (lightness / 100).clamp(0, 1).expand(-1, 3, -1, -1),
               f"predicted ({name})": picture(predicted), "ground truth": images}
    if head.grey == "false_colour":
        grey = lab[:, 1:].square().sum(dim=1).sqrt().mean(dim=(1, 2)) < head.grey_threshold
        columns["trained target (false colour)"] = picture(torch.where(grey.view(-1, 1, 1, 1),
                                                                       false_colour(lightness), lab[:, 1:]))
    return columns


def reconstructions(run: str, data: str, samples: int, seed: int, out: Path, temperature: float = 0.38) -> str:
    """Draws the run's reconstructions of the first `samples` images of `data` into `out` (a colorization
    run: its predicted colours); returns the picture's title."""
    method, recipe, checkpoint = load_run_method(run)
    if hasattr(method, "colourise"):  # the evaluation crop in RGB, [0, 1]: lightness and truth come from it
        recipe = dataclasses.replace(eval_recipe(recipe), lightness_input=False)
        batch = next(InputStack(recipe, data, batch_size=samples, seed=seed, training=False, num_threads=1))
        options = method_options_text(checkpoint)
        title = f"{method.name} {checkpoint.parent.parent.name} {checkpoint.name}{options}: predicted colours"
        draw_reconstructions(colour_columns(method, batch.views[0].float().cpu(), temperature), batch.keys,
                             recipe, title, out)
        return title
    if not hasattr(method, "inpainted"):
        raise ValueError(f"--run {run}: a {method.name} run draws no reconstructions (inpainting runs do)")
    recipe = eval_recipe(recipe).with_pretext(recipe.pretext)  # the centred crop, with the training hole
    batch = next(InputStack(recipe, data, batch_size=samples, seed=seed, training=False, num_threads=1))
    hole = recipe.pretext[0]
    title = (f"{method.name} {checkpoint.parent.parent.name} {checkpoint.name}\n{hole.mask} hole, {hole.ratio:g} of "
             f"the area, {hole.overlap}-px overlap")
    draw_reconstructions(method.inpainted(batch), batch.keys, recipe, title, out)
    return title


def method_options_text(checkpoint: Path) -> str:
    options = json.loads((checkpoint / "meta.json").read_text())["config"].get("method_options")
    return f" ({options})" if options else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="swav", help="recipe preset (default: %(default)s)")
    parser.add_argument("--multicrop", default=None, help="override the crops, e.g. 2x224+6x96")
    parser.add_argument("--data", default=None, help="shard directory (default: the demo training shards; "
                        "with --run the demo validation shards)")
    parser.add_argument("--run", default=None, help="draw this inpainting run's reconstructions (a run or "
                        "checkpoint directory) instead of a recipe's views")
    parser.add_argument("--samples", type=int, default=4, help="rows to draw (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=None, help="mask patch size for mae/sim recipes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="views.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.38,
                        help="a colorization --run: the annealed mean's temperature (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.run:
        try:
            print(reconstructions(args.run, args.data or str(DEMO_VAL), args.samples, args.seed, Path(args.out),
                                  args.temperature))
        except (RecipeError, ShardError, ValueError, OSError) as error:
            print(f"show_views: error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
        return 0
    args.data = args.data or str(DEMO_TRAIN)
    try:
        recipe = preset(args.method)
        if args.patch_size and recipe.masking is not None:
            recipe = dataclasses.replace(recipe, masking=dataclasses.replace(recipe.masking, patch_size=args.patch_size))
        if args.multicrop:
            recipe = recipe.with_multicrop(args.multicrop)
        stack = InputStack(recipe, args.data, batch_size=args.samples, seed=args.seed)
        batch = next(stack)
    except (RecipeError, ShardError) as error:
        print(f"show_views: error: {error}", file=sys.stderr)
        return 2
    print(recipe.describe())
    draw(batch, recipe, args.samples, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
