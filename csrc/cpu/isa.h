// The instruction sets the CPU kernels are compiled for, the one chosen at run time, and the
// macro that compiles a kernel once per instruction set.
#pragma once

namespace ffnskip::cpu {

// Instruction sets the kernels are compiled for: x86-64-v4 (AVX-512 F/BW/DQ/VL),
// x86-64-v3 (AVX2, FMA, F16C) and the build's baseline.
enum class Isa { Default, Avx2, Avx512 };

// The best instruction set this CPU and OS support, or a lower one named by the environment
// variable FFNSKIP_CPU_ISA (avx512, avx2, default) so tests can cover every path on one
// machine. Read once per process; throws std::invalid_argument for an unknown name or one the
// CPU lacks (then again on the next call).
Isa kernel_isa();
const char* isa_name(Isa isa);
// The best this CPU supports, whatever the environment says.
Isa best_isa();
// Whether the CPU has AVX-512 VNNI (vpdpbusd, vpdpwssd): Ice Lake, Zen 4 and later, not
// Skylake-X. The quantised kernels of Isa::Avx512 use it where it is there.
bool has_avx512_vnni();

}  // namespace ffnskip::cpu

// The target attributes of the per-instruction-set copies of a kernel. The arch= levels are
// detected by CPU features (arch=haswell would only ever match a Haswell).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FFNSKIP_X86_DISPATCH 1
#define FFNSKIP_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FFNSKIP_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#endif

// Defines `name`_Default, _Avx2 and _Avx512: copies of the always-inline kernel template
// `name<Isa>` compiled for each instruction set (everything inlined into them takes their
// target; the template argument lets a kernel pick ISA-specific code), and `name`_for_isa(isa)
// returning the copy for `isa` (one the CPU supports). `params` and `args` are parenthesised.
#define FFNSKIP_ISA_VARIANT(target, ret, name, isa, params, args) \
  target __attribute__((flatten)) ret name##_##isa params {        \
    return name<::ffnskip::cpu::Isa::isa> args;                   \
  }
#ifdef FFNSKIP_X86_DISPATCH
#define FFNSKIP_ISA_VARIANTS(ret, name, params, args)                         \
  FFNSKIP_ISA_VARIANT(, ret, name, Default, params, args)                     \
  FFNSKIP_ISA_VARIANT(FFNSKIP_TARGET_AVX2, ret, name, Avx2, params, args)     \
  FFNSKIP_ISA_VARIANT(FFNSKIP_TARGET_AVX512, ret, name, Avx512, params, args) \
  inline auto name##_for_isa(::ffnskip::cpu::Isa isa) {                      \
    switch (isa) {                                                            \
      case ::ffnskip::cpu::Isa::Avx512: return &name##_Avx512;                \
      case ::ffnskip::cpu::Isa::Avx2: return &name##_Avx2;                    \
      default: return &name##_Default;                                        \
    }                                                                         \
  }
#else
#define FFNSKIP_ISA_VARIANTS(ret, name, params, args)     \
  FFNSKIP_ISA_VARIANT(, ret, name, Default, params, args) \
  inline auto name##_for_isa(::ffnskip::cpu::Isa) { return &name##_Default; }
#endif
