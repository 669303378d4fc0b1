/* A small C ABI over the runtime (for ctypes, other languages and the Python tests).
 *
 * Requests and results are JSON strings; every call is thread-safe. Functions returning a
 * pointer return NULL on failure and int functions return nonzero; peft_export_last_error()
 * then gives the message of the calling thread's last failure. Free returned strings with
 * peft_export_free. */
#ifndef PEFT_EXPORT_C_API_H
#define PEFT_EXPORT_C_API_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct peft_export_runtime peft_export_runtime;

/* options_json (may be NULL): {"backend": "ort", "threads": 0, "denormals_as_zero": true,
 * "optimization": "all", "huge_pages": true, "slots": 0, "engine": "", "plugin_library": "",
 * "multilora_library": "", "quant_accuracy": -1} */
peft_export_runtime* peft_export_open(const char* bundle_dir, const char* options_json);
void peft_export_close(peft_export_runtime* runtime);

/* request_json: {"rows": [{"prompt_ids": [..] | "text": "..", "adapter": "name",
 * "max_new_tokens": 64, "temperature": 0, "top_k": 0, "top_p": 1, "seed": 1,
 * "stop_token_ids": [], "ignore_eos": false}]}
 * result: {"rows": [{"prompt_ids", "token_ids", "text", "finish_reason"}],
 *          "prefill_seconds", "decode_seconds", "steps"} */
char* peft_export_generate(peft_export_runtime* runtime, const char* request_json);

/* Encoder (BERT-family) bundles; peft_export_open opens either kind, as the manifest says.
 * request_json: {"rows": [{"input_ids": [..], "attention_mask": [..] (optional),
 * "token_type_ids": [..] (optional), "adapter": "name" | null, "context_mask": [..] (question
 * answering, optional: positions an answer may use)}], "max_answer_tokens": 30}
 * result: {"task", "seconds", "rows": [{"adapter", "labels", "outputs": {name: {"shape",
 * "values"}}, and per task: "label", "score", "scores" {label: p} (sequence classification);
 * "tags" [{"position", "label", "score"}] (token classification); "answer" {"start", "end",
 * "score"} (question answering); "embedding" [..] (feature extraction)}]}
 * Outputs are cut to each row's tokens and its adapter's own labels. */
char* peft_export_encode(peft_export_runtime* runtime, const char* request_json);

/* op: "load", "drop" (adds "dropped": false while a request uses it) or "status" (name
 * ignored). Returns the store's state: {"held": [names], "resident": {name: slot},
 * "swaps": n, "slots": n}. */
char* peft_export_adapters(peft_export_runtime* runtime, const char* op, const char* name);

const char* peft_export_last_error(void);
void peft_export_free(char* text);

#ifdef __cplusplus
}
#endif

#endif /* PEFT_EXPORT_C_API_H */
