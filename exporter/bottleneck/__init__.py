"""Runtime-mode bottleneck adapters saved by the AdapterHub `adapters` library.

Entry points: `planner.plan_bottleneck_banks` (export pipeline planner),
`bundle_adapters.add_bottleneck_adapter` (`adapters add`), `folder.is_library_folder` /
`folder.read_bottleneck` (reading a saved folder without the library).
"""

NO_LIBRARY_REFERENCE = (
    "a bottleneck adapter's reference is the adapters library's forward, which peft-export "
    "does not install (it pins transformers 4.57); only its rows' mixed-batch consistency is "
    "checked here (CI compares it with the library: tests/test_bottleneck_*.py)"
)
"""Why `verify` lists bottleneck adapters as not verified (decoder and encoder bundles)."""
