"""Train several models one after another in one process group, as tests/test_architectures.py needs (one torchrun
per attention and loss path rather than one per model):

    torchrun --nproc-per-node 2 tests/train_many.py SPEC.json

SPEC: {"models": {name: model_dir}, "output_root": dir, "config": {TrainConfig field: value}, "overrides": {name:
{TrainConfig field: value}}} ("overrides" optional); each model's run writes to output_root/name like
`train.py --output-dir output_root/name` would.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leaky_model  # noqa: E402, F401  (registers the test-only leaky_qwen2 model type)
import setup_model  # noqa: E402
import train  # noqa: E402
from utils import destroy_distributed, exit_on_user_error, init_distributed  # noqa: E402


@exit_on_user_error
def main(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    dist = init_distributed()
    try:
        for name, model_dir in spec["models"].items():
            output_dir = str(Path(spec["output_root"]) / name)
            config = spec["config"] | spec.get("overrides", {}).get(name, {})
            cfg = train.TrainConfig(**config, model_name_or_path=model_dir, output_dir=output_dir)
            cfg.validate()
            train.run_training(cfg, dist, setup_model.check_model_path(model_dir))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
