"""Prompt-side methods (prefix, prompt tuning, P-tuning, AdaptionPrompt) as graph inputs.

Entry points for other parts: `planner.plan_prompt_inputs` (export pipeline planner),
`cli_options.prompt_input_options` (export flags), `bundle_adapters.add_prompt_adapter`
(`adapters add`), and `convert.convert_prompt_adapter` (PEFT folder -> adapter tensors).
The run-time side is `peft_export.runtime.prompt_inputs`.
"""
