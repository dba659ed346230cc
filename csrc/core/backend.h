// What the core asks of a backend (CPU, CUDA): run passes of an execution plan (plan.h) over
// its own copy of the weights and KV cache. Internal to the library.
#pragma once

#include <cstdint>
#include <vector>

#include "ffnskip/decoder.h"
#include "plan.h"

namespace ffnskip {

class Backend {
 public:
  virtual ~Backend() = default;

  // Later passes follow `plan` (a copy is kept); draft steps follow the draft plan.
  virtual void set_plan(const ExecutionPlan& plan) = 0;
  virtual void set_draft_plan(const ExecutionPlan& plan) = 0;
  // One pass over pass.n tokens at positions [pass.pos, pass.pos + n); writes the logits of
  // the last token (of every token for Verify) to pass.logits and, for a decode or draft
  // step, pass.record. A pass that routes for the draft only runs every layer of its own plan
  // and keeps every layer's cache.
  virtual void run(const Pass& pass) = 0;
  // Forgets the sequence's FiRST routing: every layer runs (and has its cache) again.
  virtual void reset_routing() = 0;

  // The current sequence's FiRST routing: per layer 1 when the layer runs, and its router's
  // gate (NaN until a FiRST pass has routed it; every layer runs under other policies).
  virtual void sequence_layers(std::vector<uint8_t>& active, std::vector<float>& gate) const = 0;
  // KV cache allocated now; FiRST releases the cache of the layers a sequence skips (CPU).
  virtual int64_t kv_cache_bytes() const = 0;
  // The weights as stored (after any conversion), for the decoder's byte counts.
  virtual WeightFootprint weight_footprint() const = 0;
  // The type the backend holds a weight matrix in that the checkpoint stores as `stored`.
  virtual TensorType held_type(TensorType stored) const = 0;
  // Kernels one decode step of the policy launches, counted in its captured graph; 0 until a
  // graph is captured, and on backends without graphs.
  virtual int decode_step_kernels() const = 0;
};

}  // namespace ffnskip
