#!/usr/bin/env bash
# PEFT's own merge tests with lorasc_fast.patch_peft() applied - a documented check, not CI.
#
# Downloads the PEFT sdist that matches the installed peft (network), unpacks it in a
# temporary directory, adds a conftest.py there (stubs for the optional diffusers/datasets
# imports of PEFT's test helpers; patch_peft() when LORASC_PATCH=1), and runs the LoRA/DoRA
# merge tests that build their models from configs (no hub downloads) twice: without and
# with the patch. The repository is never written to.
#
# Usage:  tests/peft_upstream/run_peft_merge_tests.sh [extra pytest args]
# Env:    PEFT_VERSION (default: the installed one), LORASC_BACKEND (patch_peft backend),
#         KEEP=1 keeps the temporary directory.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEFT_VERSION=${PEFT_VERSION:-$(python -c "import peft; print(peft.__version__)")}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/peft_upstream.XXXXXX")
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT

pip download --quiet --no-deps --no-binary :all: "peft==$PEFT_VERSION" -d "$WORK/sdist"
tar xzf "$WORK/sdist/peft-$PEFT_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/peft-$PEFT_VERSION"
touch "$SRC/tests/__init__.py"  # the sdist's tests use relative imports
cat > "$SRC/tests/conftest.py" <<'PY'
import importlib.util
import os
import sys
import types


def _stub(name, **attrs):
    """Optional dependencies that PEFT's test helpers import at module level only."""
    if importlib.util.find_spec(name) is None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def _unavailable(*args, **kwargs):
    raise RuntimeError("stubbed optional dependency (offline run)")


_stub("diffusers", StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))
_stub("datasets", load_dataset=_unavailable)

CALLS = {}

if os.environ.get("LORASC_PATCH") == "1":
    import lorasc_fast
    from lorasc_fast import ops, peft_patch

    def _counted(owner, name):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            CALLS[name] = CALLS.get(name, 0) + 1
            return fn(*args, **kwargs)

        setattr(owner, name, wrapper)

    _counted(ops, "merge_")  # peft_patch calls ops.merge_
    for _name in ("dora_merge_", "dora_unmerge_", "dora_weight_norm"):
        _counted(peft_patch, _name)
    lorasc_fast.patch_peft(backend=os.environ.get("LORASC_BACKEND") or None)


def pytest_terminal_summary(terminalreporter):
    import peft

    patched = os.environ.get("LORASC_PATCH") == "1"
    terminalreporter.write_line(f"peft {peft.__version__} from {peft.__file__}; patched: {patched}; "
                                f"fused op calls: {CALLS}")
PY

SELECTION="merge and (lora or dora)"
FILES=(tests/test_custom_models.py tests/test_lora_variants.py tests/test_initialization.py)
cd "$SRC"
status=0
for patch in 0 1; do
    echo "=== LORASC_PATCH=$patch: pytest ${FILES[*]} -k '$SELECTION'"
    log="$WORK/pytest_patch$patch.log"
    LORASC_PATCH=$patch PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
        python -m pytest -o addopts="" -p no:cacheprovider -q -rfE "${FILES[@]}" \
        -k "$SELECTION" "$@" > "$log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR) |^peft |[0-9]+ (passed|failed)" "$log" || tail -n 40 "$log"
done
[[ "${KEEP:-0}" == 1 ]] && echo "logs: $WORK/pytest_patch{0,1}.log"
exit $status
