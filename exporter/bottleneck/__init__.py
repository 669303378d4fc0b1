"""Runtime-mode bottleneck adapters saved by the AdapterHub `adapters` library.

Entry points: `planner.plan_bottleneck_banks` (export pipeline planner),
`bundle_adapters.add_bottleneck_adapter` (`adapters add`), `folder.is_library_folder` /
`folder.read_bottleneck` (reading a saved folder without the library).
"""
