# Decides whether the TensorRT backend is built (PEFT_EXPORT_WITH_TENSORRT).
#
# TensorRT is found under TENSORRT_ROOT (include/NvInfer.h, lib/libnvinfer.so) or in the
# system paths. With TensorRT headers but no library (a compile-only check against the
# public NVIDIA/TensorRT headers), set PEFT_EXPORT_TENSORRT_COMPILE_ONLY=ON: the backend is
# compiled into an object library, not linked.
set(PEFT_EXPORT_WITH_TENSORRT OFF)
option(PEFT_EXPORT_TENSORRT_COMPILE_ONLY "Compile the TensorRT backend without linking it" OFF)
if(PEFT_EXPORT_TENSORRT STREQUAL "OFF")
  return()
endif()
find_path(TENSORRT_INCLUDE_DIR NvInfer.h HINTS "${TENSORRT_ROOT}" "$ENV{TENSORRT_ROOT}"
          PATH_SUFFIXES include include/x86_64-linux-gnu)
find_library(TENSORRT_LIBRARY nvinfer HINTS "${TENSORRT_ROOT}" "$ENV{TENSORRT_ROOT}"
             PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
find_package(CUDAToolkit QUIET)
if(TENSORRT_INCLUDE_DIR AND CUDAToolkit_FOUND AND (TENSORRT_LIBRARY OR PEFT_EXPORT_TENSORRT_COMPILE_ONLY))
  if(TENSORRT_LIBRARY AND NOT PEFT_EXPORT_TENSORRT_COMPILE_ONLY)
    set(PEFT_EXPORT_WITH_TENSORRT ON)
  endif()
  message(STATUS "TensorRT headers: ${TENSORRT_INCLUDE_DIR}; library: ${TENSORRT_LIBRARY}")
elseif(PEFT_EXPORT_TENSORRT STREQUAL "ON")
  message(FATAL_ERROR "TensorRT not found: pass -DTENSORRT_ROOT=<TensorRT install> "
                      "(with include/NvInfer.h and lib/libnvinfer.so) and install the CUDA toolkit")
else()
  message(STATUS "TensorRT not found: the TensorRT backend is not built")
endif()
