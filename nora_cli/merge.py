"""Library API of `nora merge`, for the CLI, training and evaluation (implementation in nora_cli.export).

    merge_adapter(adapter_dir, out_dir, *, base=None, dtype=None, fmt=None, max_shard_size="5GB",
                  overwrite=False, verify=False, allow_pickle=False) -> MergeReport
    verify_merge(adapter_dir, export_dir, *, base=None, fmt="merged", dtype="fp32") -> VerifyReport
    save_converted_adapter(peft_model, out_dir, initial_adapter_dir) -> Path
"""

from nora_cli.export.api import DEFAULT_FORMAT, EXPORTERS, FORMATS, adapter_task, merge_adapter
from nora_cli.export.convert import save_converted_adapter
from nora_cli.export.job import Exporter, ExportJob, MergeReport, VerifyError, VerifyReport
from nora_cli.export.verify import verify_merge

__all__ = [
    "DEFAULT_FORMAT",
    "EXPORTERS",
    "FORMATS",
    "ExportJob",
    "Exporter",
    "MergeReport",
    "VerifyError",
    "VerifyReport",
    "adapter_task",
    "merge_adapter",
    "save_converted_adapter",
    "verify_merge",
]
