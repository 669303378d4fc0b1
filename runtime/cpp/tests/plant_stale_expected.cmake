# ctest step run before export_tiny_bundle (cmake -DOUT=<fixture folder> -P this file).
#
# Writes an expected.json whose ids no runtime can produce (-1), in the fixture's format, as
# if an earlier run had left it. export_tiny_bundle must replace it with ids computed now;
# if it reused the file, test_generation would compare with these and fail.
file(MAKE_DIRECTORY "${OUT}")
file(WRITE "${OUT}/expected.json" [=[
{"prompts": [[1, 17, 42, 99, 5, 230, 64], [1, 50], [1, 200, 13, 99, 4]], "max_new_tokens": 1,
 "bundles": [{"name": "bundle", "adapters": [null, null, null],
              "runs": [{"quant_accuracy": -1, "token_ids": [[-1], [-1], [-1]]}]}]}
]=])
