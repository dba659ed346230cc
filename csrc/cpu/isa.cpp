#include "isa.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace ffnskip::cpu {

Isa best_isa() {
#ifdef FFNSKIP_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::Avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::Avx2;
#endif
  return Isa::Default;
}

bool has_avx512_vnni() {
#ifdef FFNSKIP_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return has;
#else
  return false;
#endif
}

namespace {

Isa isa_from_environment() {
  const Isa best = best_isa();
  const char* requested = std::getenv("FFNSKIP_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  for (const Isa isa : {Isa::Default, Isa::Avx2, Isa::Avx512}) {
    if (std::string(requested) != isa_name(isa)) continue;
    if (isa > best) {
      throw std::invalid_argument(std::string("FFNSKIP_CPU_ISA=") + requested +
                                  ", but this CPU supports at most " + isa_name(best));
    }
    return isa;
  }
  throw std::invalid_argument(std::string("FFNSKIP_CPU_ISA=") + requested +
                              ": expected avx512, avx2 or default");
}

}  // namespace

Isa kernel_isa() {
  static const Isa isa = isa_from_environment();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Default: break;
  }
  return "default";
}

}  // namespace ffnskip::cpu
