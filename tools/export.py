"""Export a backbone from any checkpoint (or re-export a run's) as safetensors + JSON that timm loads.

    python tools/export.py runs/swav-x/checkpoints/step-00000500 --out exported/swav-step500

writes OUT/backbone.safetensors and OUT/backbone.json (timm name, stem, timm keyword arguments, input
size, method; "input": "lightness" for a backbone that trained on lightness, colorization's). Load it
with timm (stems other than "cifar" load into the stock model):

    import json, timm
    info = json.load(open("exported/swav-step500/backbone.json"))
    model = timm.create_model(info["timm_name"], pretrained=True, num_classes=0, **info["model_kwargs"],
                              pretrained_cfg_overlay=dict(file="exported/swav-step500/backbone.safetensors"))

With the "no-maxpool" stem set `model.maxpool = torch.nn.Identity()` after loading, as training did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpointing import export_backbone  # noqa: E402
from tools.eval_knn import EvalError, load_backbone  # noqa: E402

PROG = "export"


def export(source: str | Path, out: str | Path) -> Path:
    """The backbone of `source` written to `out` as train.py exports it, plus the `source` it came from."""
    backbone, info = load_backbone(source)
    return export_backbone(Path(out), backbone, timm_name=info["timm_name"], method=info.get("method"),
                           model_kwargs=info.get("model_kwargs"), input_size=info.get("input_size"),
                           **({"input": info["input"]} if "input" in info else {}), source=str(source))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint directory, a run directory, or a backbone.json")
    parser.add_argument("--out", required=True, help="the folder to write backbone.safetensors and backbone.json to")
    args = parser.parse_args(argv)
    try:
        path = export(args.source, args.out)
    except EvalError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"written: {path} (+ backbone.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
