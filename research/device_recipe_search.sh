#!/bin/bash
# research/recipe_search.py on a lent GPU machine, in one call of the device tool
# (research/README.md, "GPU"). That machine has PyTorch but none of this project's other
# packages and no network, so the call carries .gpu/ (ignored by git; research/README.md says
# how to fill it):
#   .gpu/whl/   wheels of pydantic, pydantic_core, annotated-types, typing-inspection,
#               typing_extensions, ruamel.yaml and cronsim for its Python 3.12
#   .gpu/raw/   the four Fashion-MNIST .gz files
# Usage there: bash research/device_recipe_search.sh OUT BUDGET_SECONDS
# Environment: GRID (research/recipe_grid.yaml), SEEDS ("1 2"), FINAL ("3 4"), SHARE (0.3),
# JOBS (12), SOLO (3 epochs), PY (python3).
set -o pipefail
out=$1 budget=$2 py=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p data/raw && for f in .gpu/raw/*.gz; do gunzip -c "$f" >"data/raw/$(basename "$f" .gz)"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
"$py" research/recipe_search.py --grid "${GRID:-research/recipe_grid.yaml}" \
    --out /tmp/search --seeds ${SEEDS:-1 2} --final-seeds ${FINAL-3 4} \
    --final-share "${SHARE:-0.3}" --jobs "${JOBS:-12}" --budget "$budget" \
    --solo-epochs "${SOLO:-3}" 2>&1 | tee "$out/driver.log"
cp /tmp/search/*.csv /tmp/search/chosen.yaml "$out/" 2>/dev/null
tar czf "$out/logs.tgz" -C /tmp/search logs  # the device tool returns at most 8 files
