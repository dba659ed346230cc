# Decides whether the CUDA backend is built (FFNSKIP_CUDA = AUTO | ON | OFF), sets
# FFNSKIP_WITH_CUDA, and defines ffnskip_add_cuda_backend(core_target).
#
# The backend is a separate shared library, libffnskip_cuda.so, that the core loads with
# dlopen() on first use (csrc/core/cuda_loader.cpp): the core library and the Python module
# then load on machines without a GPU, a driver or cuBLAS.
#
# AUTO builds it when nvcc and cuBLAS are found, ON stops with an error when either is missing,
# OFF never builds it. cuBLAS is searched, in order:
#   1. in the CUDA toolkit;
#   2. in FFNSKIP_CUBLAS_ROOT (cache or environment variable): include/cublas_v2.h and
#      lib/ (or lib64/) libcublas.so or libcublas.so.<major>;
#   3. in the nvidia-cublas wheel of the Python environment (nvidia/cu<major>/include and
#      nvidia/cu<major>/lib, versioned .so files only), asked of Python_EXECUTABLE (or python3)
#      with pip's build isolation variables removed, so that `pip install .` finds the wheel of
#      the environment it installs into; in a virtual environment, also the base
#      installation's.
# The library is linked by full path, with a run path to its directory and to
# $ORIGIN/../nvidia/cu<major>/lib (the wheel's directory beside an installed ffnskip_ext).

string(TOUPPER "${FFNSKIP_CUDA}" FFNSKIP_CUDA)
if(NOT FFNSKIP_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FFNSKIP_CUDA must be AUTO, ON or OFF, got '${FFNSKIP_CUDA}'")
endif()
if(DEFINED ENV{FFNSKIP_CUBLAS_ROOT} AND NOT FFNSKIP_CUBLAS_ROOT)
  set(FFNSKIP_CUBLAS_ROOT "$ENV{FFNSKIP_CUBLAS_ROOT}")
endif()
set(FFNSKIP_CUBLAS_ROOT "${FFNSKIP_CUBLAS_ROOT}" CACHE PATH
    "Directory with include/cublas_v2.h and lib/libcublas.so*, when the CUDA toolkit has none")

# Sets FFNSKIP_CUBLAS_INCLUDE_DIR and FFNSKIP_CUBLAS_LIBRARY in the caller when `root` holds
# cuBLAS for CUDA `major`.
function(_ffnskip_cublas_in root major)
  if(NOT EXISTS "${root}/include/cublas_v2.h")
    return()
  endif()
  foreach(dir lib lib64)
    foreach(name libcublas.so libcublas.so.${major})
      if(EXISTS "${root}/${dir}/${name}")
        set(FFNSKIP_CUBLAS_INCLUDE_DIR "${root}/include" PARENT_SCOPE)
        set(FFNSKIP_CUBLAS_LIBRARY "${root}/${dir}/${name}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
  endforeach()
endfunction()

# The nvidia namespace package directories of the Python environment (see above).
function(_ffnskip_python_nvidia_dirs out)
  set(python "${Python_EXECUTABLE}")
  if(NOT python)
    find_program(FFNSKIP_PYTHON NAMES python3 python)
    set(python "${FFNSKIP_PYTHON}")
  endif()
  if(NOT python)
    return()
  endif()
  set(probe [=[
import importlib.util, os, sys, sysconfig
dirs = []
spec = importlib.util.find_spec("nvidia")
if spec is not None and spec.submodule_search_locations:
    dirs += list(spec.submodule_search_locations)
if sys.prefix != sys.base_prefix:
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix}
    for key in ("purelib", "platlib"):
        dirs.append(os.path.join(sysconfig.get_paths(vars=base)[key], "nvidia"))
print(";".join(dirs))
]=])
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE
            "${python}" -c "${probe}"
    OUTPUT_VARIABLE dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE failed)
  if(NOT failed)
    set(${out} "${dirs}" PARENT_SCOPE)
  endif()
endfunction()

set(FFNSKIP_WITH_CUDA OFF)
set(_ffnskip_cuda_missing "")
if(NOT FFNSKIP_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_ffnskip_cuda_missing "no CUDA compiler (nvcc) was found")
  else()
    # Architectures are given as explicit -gencode flags on the target (see below).
    set(CMAKE_CUDA_ARCHITECTURES OFF)
    enable_language(CUDA)
    string(REGEX MATCH "^[0-9]+" _ffnskip_cuda_major "${CMAKE_CUDA_COMPILER_VERSION}")
    find_package(CUDAToolkit QUIET)
    set(FFNSKIP_CUBLAS_INCLUDE_DIR "")
    set(FFNSKIP_CUBLAS_LIBRARY "")
    if(TARGET CUDA::cublas)
      set(FFNSKIP_CUBLAS_INCLUDE_DIR "${CUDAToolkit_INCLUDE_DIRS}")
      get_target_property(FFNSKIP_CUBLAS_LIBRARY CUDA::cublas IMPORTED_LOCATION)
      set(_ffnskip_cublas_from "the CUDA toolkit")
    endif()
    if(NOT FFNSKIP_CUBLAS_LIBRARY AND FFNSKIP_CUBLAS_ROOT)
      _ffnskip_cublas_in("${FFNSKIP_CUBLAS_ROOT}" ${_ffnskip_cuda_major})
      set(_ffnskip_cublas_from "FFNSKIP_CUBLAS_ROOT")
    endif()
    if(NOT FFNSKIP_CUBLAS_LIBRARY)
      _ffnskip_python_nvidia_dirs(_ffnskip_nvidia_dirs)
      foreach(dir IN LISTS _ffnskip_nvidia_dirs)
        foreach(root "${dir}/cu${_ffnskip_cuda_major}" "${dir}/cublas")
          if(NOT FFNSKIP_CUBLAS_LIBRARY)
            _ffnskip_cublas_in("${root}" ${_ffnskip_cuda_major})
          endif()
        endforeach()
      endforeach()
      set(_ffnskip_cublas_from "the nvidia-cublas Python wheel")
    endif()
    if(NOT FFNSKIP_CUBLAS_LIBRARY)
      string(CONCAT _ffnskip_cuda_missing
             "cuBLAS was found neither in the CUDA toolkit, nor in FFNSKIP_CUBLAS_ROOT "
             "('${FFNSKIP_CUBLAS_ROOT}'), nor in an nvidia-cublas wheel of the Python environment")
    else()
      set(FFNSKIP_WITH_CUDA ON)
    endif()
  endif()
endif()

if(FFNSKIP_CUDA STREQUAL "ON" AND NOT FFNSKIP_WITH_CUDA)
  message(FATAL_ERROR "FFNSKIP_CUDA=ON, but ${_ffnskip_cuda_missing}")
endif()
if(FFNSKIP_WITH_CUDA)
  message(STATUS "ffnskip: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, cuBLAS "
                 "${FFNSKIP_CUBLAS_LIBRARY} from ${_ffnskip_cublas_from})")
elseif(FFNSKIP_CUDA STREQUAL "OFF")
  message(STATUS "ffnskip: CUDA backend OFF (FFNSKIP_CUDA=OFF)")
else()
  message(STATUS "ffnskip: CUDA backend OFF: ${_ffnskip_cuda_missing}")
endif()

# Adds the target ffnskip_cuda (libffnskip_cuda.so), tells `core_target` (the library holding
# the loader) to look for it, and adds bench_gemv when benchmarks are built.
function(ffnskip_add_cuda_backend core_target)
  set(cuda_dir "${PROJECT_SOURCE_DIR}/csrc/cuda")
  # The kernel families, compiled once for the library and the GEMV benchmark.
  add_library(ffnskip_cuda_kernels OBJECT
    ${cuda_dir}/decode_attention.cu
    ${cuda_dir}/dequantize.cu
    ${cuda_dir}/embedding.cu
    ${cuda_dir}/gemm.cu
    ${cuda_dir}/gemv.cu
    ${cuda_dir}/logits.cu
    ${cuda_dir}/norm.cu
    ${cuda_dir}/prefill_attention.cu
    ${cuda_dir}/quant_gemv.cu
    ${cuda_dir}/rope.cu
    ${cuda_dir}/router.cu
    ${cuda_dir}/score.cu
    ${cuda_dir}/swiglu.cu
  )
  _ffnskip_cuda_compile_settings(ffnskip_cuda_kernels)
  add_library(ffnskip_cuda SHARED
    ${cuda_dir}/cuda_backend.cu ${cuda_dir}/device.cu ${cuda_dir}/device_model.cu
    ${cuda_dir}/entry_points.cu ${cuda_dir}/kernel_calls.cu
    $<TARGET_OBJECTS:ffnskip_cuda_kernels>)
  _ffnskip_cuda_compile_settings(ffnskip_cuda)
  # The core's static archive supplies stacked_bias() and rope_inv_freq(); its symbols stay
  # private to this library.
  target_link_libraries(ffnskip_cuda PRIVATE ${core_target} "${FFNSKIP_CUBLAS_LIBRARY}")
  target_link_options(ffnskip_cuda PRIVATE "LINKER:--exclude-libs,ALL" "LINKER:--no-undefined")
  get_filename_component(cublas_dir "${FFNSKIP_CUBLAS_LIBRARY}" DIRECTORY)
  set(run_path "${cublas_dir};$ORIGIN/../nvidia/cu${_ffnskip_cuda_major}/lib")
  # The same run path in the build tree (which setup.py ships) and the install tree.
  set_target_properties(ffnskip_cuda PROPERTIES
    INSTALL_RPATH "${run_path}" BUILD_WITH_INSTALL_RPATH ON)
  install(TARGETS ffnskip_cuda LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})

  # The loader accepts only a library built against the same interface headers (their hash;
  # editing one of them re-runs the configuration).
  set(interface_headers "${cuda_dir}/entry_points.h" "${cuda_dir}/kernel_calls.h")
  foreach(header config.h decoder.h policy.h weights.h)
    list(APPEND interface_headers "${PROJECT_SOURCE_DIR}/csrc/include/ffnskip/${header}")
  endforeach()
  foreach(header backend.h model_view.h plan.h skip_rule.h)
    list(APPEND interface_headers "${PROJECT_SOURCE_DIR}/csrc/core/${header}")
  endforeach()
  set(interface_text "")
  foreach(header IN LISTS interface_headers)
    file(READ "${header}" text)
    string(APPEND interface_text "${text}")
  endforeach()
  string(SHA256 interface_hash "${interface_text}")
  string(SUBSTRING "${interface_hash}" 0 16 interface_hash)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${interface_headers})
  target_compile_definitions(ffnskip_cuda PRIVATE "FFNSKIP_CUDA_INTERFACE=\"${interface_hash}\"")

  set(library_name "${CMAKE_SHARED_LIBRARY_PREFIX}ffnskip_cuda${CMAKE_SHARED_LIBRARY_SUFFIX}")
  target_compile_definitions(${core_target} PRIVATE
    FFNSKIP_WITH_CUDA "FFNSKIP_CUDA_LIBRARY_NAME=\"${library_name}\""
    "FFNSKIP_CUDA_INTERFACE=\"${interface_hash}\"")
  target_link_libraries(${core_target} PRIVATE ${CMAKE_DL_LIBS})

  if(FFNSKIP_BUILD_BENCHMARKS)
    add_executable(bench_gemv ${PROJECT_SOURCE_DIR}/benchmarks/bench_gemv.cu
                              $<TARGET_OBJECTS:ffnskip_cuda_kernels>)
    _ffnskip_cuda_compile_settings(bench_gemv)
    target_include_directories(bench_gemv PRIVATE ${cuda_dir})
    # The core for the tensor types' names (benchmarks/random_blocks.h).
    target_link_libraries(bench_gemv PRIVATE ${core_target} "${FFNSKIP_CUBLAS_LIBRARY}")
    set_target_properties(bench_gemv PROPERTIES BUILD_RPATH "${cublas_dir}")
  endif()
endfunction()

function(_ffnskip_cuda_compile_settings target)
  # sm_80 (A100) and sm_90a (H100/H200) machine code; the gencode form, not -arch shorthands.
  # Only the entry points of the library are exported (cuda_backend.h).
  set_target_properties(${target} PROPERTIES
    CXX_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    CUDA_ARCHITECTURES OFF
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_RUNTIME_LIBRARY Static)
  target_include_directories(${target} PRIVATE
    "${PROJECT_SOURCE_DIR}/csrc/include" "${FFNSKIP_CUBLAS_INCLUDE_DIR}")
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-gencode arch=compute_80,code=sm_80>"
    "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-gencode arch=compute_90a,code=sm_90a>"
    "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-Xcompiler -Wall,-Wextra>")
endfunction()
