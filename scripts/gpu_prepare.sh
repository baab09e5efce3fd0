#!/usr/bin/env bash
# Packs, into .gpu/ (git-ignored), what scripts/bench_gpu.py needs on a bare GPU machine that has torch,
# transformers and accelerate but no datasets or bitsandbytes and no network:
#   .gpu/whl/      wheels of datasets (+ dill, multiprocess) and bitsandbytes, the latter trimmed to its
#                  CUDA 13 and CPU libraries so the whole tree stays under the 64 MiB a transfer allows;
#   .gpu/teacher/  the fine-tuned teacher with fp16 weights (bench_gpu.py upcasts them to fp32);
#   .gpu/data/     the SST-2 train and dev files.
# Then on the GPU machine:
#   pip install --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && PYTHONPATH=/tmp/site \
#     python3 scripts/bench_gpu.py --teacher .gpu/teacher --train-file .gpu/data/train.tsv \
#       --eval-file .gpu/data/dev.tsv --out OUT
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-runs/sst2_minilm/teacher}
DATA=${DATA:-../shared/data/sst2}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/teacher .gpu/data
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
py=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
.venv/bin/python -m pip download -q --no-deps "${py[@]}" -d .gpu/whl \
  "datasets==$(.venv/bin/python -c 'import datasets; print(datasets.__version__)')" dill multiprocess \
  "bitsandbytes==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')"
for whl in .gpu/whl/bitsandbytes-*.whl; do
  zip -q -d "$whl" 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*' || true
done
.venv/bin/python - "$TEACHER" <<'PY'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(".gpu/teacher")
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
w = load_file(src / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in w.items()}, dst / "model.safetensors",
          metadata={"format": "pt"})
PY
cp "$DATA/train.tsv" "$DATA/dev.tsv" .gpu/data/
du -sh .gpu .gpu/*
