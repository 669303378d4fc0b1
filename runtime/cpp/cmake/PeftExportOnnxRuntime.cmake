# Locates ONNX Runtime headers and library and defines the private target
# peft_export_onnxruntime.
#
# Headers: ONNXRUNTIME_INCLUDE_DIR, else third_party/onnxruntime-dev (scripts/
# fetch_ort_headers.sh), else a system install. Library: ONNXRUNTIME_LIBRARY, else the
# `onnxruntime` Python wheel's capi/ folder, else a system libonnxruntime. The wheel ships
# only libonnxruntime.so.<version> while its SONAME is libonnxruntime.so.1, so a link folder
# with the SONAME and the development name is made in the build tree.
set(_repo_root "${CMAKE_CURRENT_LIST_DIR}/../../..")
find_path(ONNXRUNTIME_INCLUDE_DIR onnxruntime_cxx_api.h
  HINTS "${_repo_root}/third_party/onnxruntime-dev/usr/include/onnxruntime"
  PATH_SUFFIXES onnxruntime)
if(NOT ONNXRUNTIME_INCLUDE_DIR)
  message(FATAL_ERROR "ONNX Runtime C++ headers not found: run scripts/fetch_ort_headers.sh, "
                      "or pass -DONNXRUNTIME_INCLUDE_DIR=<dir with onnxruntime_cxx_api.h>")
endif()

if(NOT ONNXRUNTIME_LIBRARY)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
              "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"
      OUTPUT_VARIABLE _ort_capi OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_ort_capi)
      file(GLOB _ort_candidates "${_ort_capi}/libonnxruntime.so*")
      list(SORT _ort_candidates)
      if(_ort_candidates)
        list(GET _ort_candidates -1 _ort_wheel_lib)
        set(ONNXRUNTIME_LIBRARY "${_ort_wheel_lib}" CACHE FILEPATH "ONNX Runtime library")
      endif()
    endif()
  endif()
endif()
find_library(ONNXRUNTIME_LIBRARY onnxruntime)
if(NOT ONNXRUNTIME_LIBRARY)
  message(FATAL_ERROR "libonnxruntime not found: pip install onnxruntime, or pass "
                      "-DONNXRUNTIME_LIBRARY=<path to libonnxruntime.so>")
endif()

get_filename_component(_ort_real "${ONNXRUNTIME_LIBRARY}" REALPATH)
set(PEFT_EXPORT_ORT_SONAME "libonnxruntime.so.1")
set(PEFT_EXPORT_ORT_LINK_DIR "${CMAKE_BINARY_DIR}/onnxruntime-lib")
file(MAKE_DIRECTORY "${PEFT_EXPORT_ORT_LINK_DIR}")
file(CREATE_LINK "${_ort_real}" "${PEFT_EXPORT_ORT_LINK_DIR}/${PEFT_EXPORT_ORT_SONAME}" SYMBOLIC)
file(CREATE_LINK "${_ort_real}" "${PEFT_EXPORT_ORT_LINK_DIR}/libonnxruntime.so" SYMBOLIC)
set(ONNXRUNTIME_LIBRARY "${_ort_real}")

add_library(peft_export_onnxruntime INTERFACE)
target_link_libraries(peft_export_onnxruntime INTERFACE "${PEFT_EXPORT_ORT_LINK_DIR}/libonnxruntime.so")
message(STATUS "ONNX Runtime headers: ${ONNXRUNTIME_INCLUDE_DIR}")
message(STATUS "ONNX Runtime library: ${_ort_real}")
