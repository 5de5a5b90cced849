"""`hdee export`: a configuration's ensemble as a self-contained transformers model directory.

OUT/
  config.json              HdeeEnsembleConfig: members, posterior, prior, routing, auto_map, and
                           under `hdee.ensemble` the resolved ensemble spec that produced it
  model.safetensors        every member's weights (experts.<j>.*), never a pickle; a member the
                           spec excludes is not in it
  modeling_hdee.py         the model code (a copy of hdee/hf_ensemble.py: torch + transformers)
  selection.py             the routing rules it imports (a copy of hdee/selection.py)
  generation_config.json
  tokenizer.json, tokenizer_config.json, ...   the run's tokenizer

so `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(OUT)` load it anywhere transformers runs (docs/export.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from hdee import hf_ensemble, selection
from hdee.config import load_config
from hdee.ensemble_spec import EnsembleSpec, spec_defaults
from hdee.inference import build_ensemble, resolve_ensemble
from hdee.layout import RunLayout
from hdee.outputs import check_output_directory, output_directory

EXPORT_COMMAND = "hdee export"
MODELING_FILE = "modeling_hdee.py"
# Files of hdee copied beside the model code (it imports them relatively).
SHIPPED_MODULES = {MODELING_FILE: hf_ensemble, "selection.py": selection}
AUTO_MAP = {
    "AutoConfig": "modeling_hdee.HdeeEnsembleConfig",
    "AutoModelForCausalLM": "modeling_hdee.HdeeEnsembleForCausalLM",
}


def export_ensemble(
    run_dir: str | Path,
    configuration: str,
    out: str | Path,
    spec: EnsembleSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the ensemble `spec` describes (default: the run's evaluation keys) to `out`
    atomically (replacing an older export; `overwrite`: beside what is in a directory that is
    not one, hdee.outputs)."""
    layout = RunLayout.of(run_dir)
    check_output_directory(out, EXPORT_COMMAND, "OUT", overwrite)  # before any model loads
    config = load_config(layout.config, overrides={"run_dir": str(layout.root)})
    if spec is None:
        spec = EnsembleSpec(**spec_defaults(config.evaluation))
    resolved = resolve_ensemble(spec, config, layout, configuration)
    ensemble = build_ensemble(resolved, layout, config.data.seq_len, device="cpu")
    ensemble.config.auto_map = dict(AUTO_MAP)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    out = Path(out)
    with output_directory(out, EXPORT_COMMAND, "OUT", overwrite) as tmp:
        ensemble.save_pretrained(tmp)  # safetensors: transformers never pickles weights here
        tokenizer.save_pretrained(tmp)
        for name, module in SHIPPED_MODULES.items():
            shutil.copyfile(str(module.__file__), tmp / name)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"{out}: save_pretrained did not write model.safetensors")
    return out
