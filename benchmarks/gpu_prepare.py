"""Everything the GPU benchmark needs that the GPU machine cannot fetch, into one folder.

    benchmarks/.venv/bin/python benchmarks/gpu_prepare.py .gpu

writes DIR/data (the HH rows every workload trains on, as run.py writes them) and
DIR/tokenizer (SmolLM2's tokenizer and chat template); benchmarks/random_model.py
builds the 0.5-1.5B model there from the tokenizer, and benchmarks/gpu.sh runs it all.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import write_data  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                   "generation_config.json")


def main(out: Path, pairs: int) -> None:
    from ulma.models import resolve_model_path

    (out / "data").mkdir(parents=True, exist_ok=True)
    meta = write_data(out / "data", pairs, 250)
    (out / "data" / "data.json").write_text(json.dumps(meta))
    src = Path(resolve_model_path("smollm2-135m-instruct"))
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / "tokenizer" / name)
    print(f"{out}: {meta['pairs']} pairs, tokenizer from {src}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 128)
