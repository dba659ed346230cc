# Decides whether the CUDA backend is built (FFNSKIP_CUDA = AUTO | ON | OFF).
# The CUDA backend lands with its own issue; until then AUTO resolves to OFF and ON fails
# loudly instead of silently producing a CPU-only build.
string(TOUPPER "${FFNSKIP_CUDA}" FFNSKIP_CUDA)
if(NOT FFNSKIP_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FFNSKIP_CUDA must be AUTO, ON or OFF, got '${FFNSKIP_CUDA}'")
endif()
set(FFNSKIP_WITH_CUDA OFF)
if(FFNSKIP_CUDA STREQUAL "ON")
  message(FATAL_ERROR "FFNSKIP_CUDA=ON: the CUDA backend is not part of this version yet")
endif()
message(STATUS "ffnskip: CUDA backend ${FFNSKIP_WITH_CUDA} (FFNSKIP_CUDA=${FFNSKIP_CUDA})")
