// Autograd of the lora ops, in C++ (TORCH_LIBRARY_IMPL(lora, Autograd)).
//
// lora::linear saves x, weight, the adapters, xa (M x r) and the seed, and its backward
// calls lora::linear_backward with the mask of the gradients autograd needs; the dropout
// mask is regenerated there from the seed. With 'post' dropout, where the graph is not kept,
// the backward is that op's two halves instead (lora::post_dropout_grad_y, then
// lora::linear_backward_from_grad_xa; the same kernels and bits) with xa released between
// them, so that xa is not alive beside dA and dx (benchmarks/NOTES.md #74).
// lora::linear_backward is not differentiable: differentiating it (double backward) raises
// "derivative for lora::linear_backward is not implemented" when that backward runs.
//
// Why C++ and not torch.library.register_autograd (which this replaced): the Python
// registration runs Python on every call of the op, in eager mode and also inside
// torch.compile'd graphs (the compiled graph calls the op with grad disabled, and the
// Python autograd kernel still runs to find that out). Measured on the H200 host
// (benchmarks/host_overhead.py, tiny layer): fwd+bwd 633 us of host time with the Python
// registration vs 352 us for the PEFT formulation; in a torch.compile'd training step at
// 1024 tokens (bench_train.py --quick --profile) ~100 us of Python per lora::linear_backward
// call. Small layers and decode are host-bound, so that was the step time.
#include <torch/extension.h>

#include <ATen/SavedTensorHooks.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/graph_task.h>

#include "lora_aten.h"

namespace lora {
namespace {

using OptTensor = std::optional<at::Tensor>;

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, double, double,
    c10::string_view, const OptTensor&, c10::string_view)>&
linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora::linear", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                 const at::Tensor&, double, double, c10::string_view, const OptTensor&,
                                 c10::string_view)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, double, c10::string_view, const OptTensor&, std::array<bool, 5>, c10::string_view)>&
linear_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora::linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, double, double, c10::string_view, const OptTensor&, std::array<bool, 5>,
              c10::string_view)>();
  return op;
}

// The two halves of linear_backward with 'post' dropout (lora.cpp).
const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&, std::array<bool, 2>,
    c10::SymInt)>&
post_dropout_grad_y_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora::post_dropout_grad_y", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, double, double,
                                                                       const at::Tensor&, std::array<bool, 2>,
                                                                       c10::SymInt)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    std::array<bool, 4>)>&
linear_backward_from_grad_xa_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora::linear_backward_from_grad_xa", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, std::array<bool, 4>)>();
  return op;
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Whether lora::linear_backward on x's device with this backend argument runs linear_backward_aten
// (CPU, and CUDA's native path), the only path the two halves above implement.
bool backward_runs_aten(const at::Tensor& x, const std::string& backend) {
  if (x.is_cpu()) return true;
#ifdef LORA_WITH_CUDA
  return x.is_cuda() && !use_triton(backend);
#else
  return false;
#endif
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                               const OptTensor& weight, const OptTensor& bias,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                               double dropout_p, const std::string& dropout_position,
                                               const OptTensor& seed, const std::string& backend) {
    at::Tensor y, xa;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, xa) = linear_op().call(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed,
                                         backend);
    }
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    // With 'post' dropout the backward frees xa once its masked step is done (below), so xa is kept
    // where the backward can drop it: in saved_data, its version checked by hand as a saved variable's
    // would be. Under saved-tensor hooks (offloading, checkpointing) it is saved like the rest, so that
    // the hooks see it: then it lives until the backward ends.
    const bool xa_releasable =
        dropout_p > 0.0 && dropout_position == "post" && !at::SavedTensorDefaultHooks::get_hooks().has_value();
    ctx->save_for_backward({x, has_weight ? *weight : at::Tensor(), lora_A, lora_B,
                            xa_releasable ? at::Tensor() : xa, seed.has_value() ? *seed : at::Tensor()});
    if (xa_releasable) {
      ctx->saved_data["xa"] = xa;
      ctx->saved_data["xa_version"] = xa._version();
    }
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["dropout_position"] = dropout_position;
    ctx->saved_data["backend"] = backend;
    ctx->saved_data["has_weight"] = has_weight;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->mark_non_differentiable({xa});
    // Autograd would otherwise hand backward a zero-filled (M, r) tensor for xa's gradient (always
    // undefined: xa is not differentiable) on every call, an allocation and a fill kernel the
    // backward never reads: +256 KiB of peak memory at M = 8192, r = 16, +1 MiB at r = 64.
    ctx->set_materialize_grads(false);
    return {y, xa};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the forward's tensor inputs that were defined (its edges):
    // x, then weight and bias when given, then lora_A, lora_B.
    size_t edge = 0;
    const bool need_x = ctx->needs_input_grad(edge++);
    const bool need_weight = has_weight && ctx->needs_input_grad(edge++);
    const bool need_bias = has_bias && ctx->needs_input_grad(edge++);
    const bool need_A = ctx->needs_input_grad(edge++);
    const bool need_B = ctx->needs_input_grad(edge++);
    const std::array<bool, 5> mask{need_x, need_weight, need_bias, need_A, need_B};
    torch::autograd::variable_list out(10);
    // xa kept in saved_data by the forward (xa_releasable) is released where a saved variable would be:
    // when the graph is not kept, once this call has done with it (the engine clears only the saved
    // variables, so without this xa would live as long as the graph). Not before a call has succeeded: a
    // backward that failed (e.g. out of memory) may be tried again, as with saved variables.
    const bool keep_graph = torch::autograd::get_current_graph_task_keep_graph();
    const bool xa_in_saved_data = ctx->saved_data.count("xa") != 0;
    auto release_xa = [&] {
      if (xa_in_saved_data && !keep_graph) ctx->saved_data.erase("xa");
    };
    // No gradient for y (a later node returned none for it): no gradient for any input, as built-in ops do.
    if (!grads[0].defined() || !(need_x || need_weight || need_bias || need_A || need_B)) {
      release_xa();
      return out;
    }

    const std::string position = ctx->saved_data["dropout_position"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    const double scale = ctx->saved_data["scale"].toDouble();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    at::Tensor xa = saved[4];
    if (!xa.defined()) {  // kept in saved_data by forward (xa_releasable)
      // Missing only after an earlier backward of this node failed past its first half (one that
      // succeeded without keeping the graph freed the saved variables too: get_saved_variables raised).
      TORCH_CHECK(xa_in_saved_data, "lora: xa, saved for lora::linear's backward, was already released by an "
                                    "earlier backward of this node that failed part-way");
      xa = ctx->saved_data.at("xa").toTensor();
      const int64_t saved_version = ctx->saved_data["xa_version"].toInt();
      TORCH_CHECK(xa._version() == saved_version,
                  "lora: xa (lora::linear's second output, saved for its backward) was modified by an inplace "
                  "operation after the forward (its version is ", xa._version(), ", it was saved at version ",
                  saved_version, "): the gradients would be wrong");
    }
    at::Tensor gx, gw, gb, gA, gB;
    // 'post' dropout, once the graph is not kept: the masked step, xa released, then the rest, so that
    // xa (M x r) is not alive beside dA and dx (a peak of M x r less, the same bits). With the graph kept
    // (retain_graph, create_graph) xa must outlive this call anyway: one op; and without dA and dx
    // there is nothing to free it for (and no grad_xa for the second half).
    if (xa_in_saved_data && (need_x || need_A) && !at::GradMode::is_enabled() && !keep_graph &&
        backward_runs_aten(saved[0], backend)) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      // One contiguous copy for both halves where autograd hands in a strided g (the ops would each copy).
      const at::Tensor g = grads[0].is_cuda() ? grads[0].contiguous() : grads[0];
      at::Tensor grad_xa;
      std::tie(grad_xa, gB) = post_dropout_grad_y_op().call(g, saved[3], xa, scale, dropout_p, saved[5],
                                                            {true, need_B},
                                                            post_dropout_partial_bytes_cap(saved[0], need_x));
      release_xa();
      xa.reset();  // the last reference, unless the caller kept lora::linear's second output
      std::tie(gx, gw, gb, gA) = linear_backward_from_grad_xa_op().call(
          g, saved[0], optional_of(saved[1]), saved[2], saved[3], grad_xa, {need_x, need_weight, need_bias, need_A});
    } else {
      // grads[1] (for xa, non-differentiable) is ignored.
      auto call = [&] {
        return linear_backward_op().call(grads[0], saved[0], optional_of(saved[1]), saved[2], saved[3], xa, scale,
                                         dropout_p, position, optional_of(saved[5]), mask, backend);
      };
      if (at::GradMode::is_enabled()) {
        // create_graph=True: through linear_backward's autograd kernel, so that
        // differentiating these gradients raises instead of silently giving zeros.
        std::tie(gx, gw, gb, gA, gB) = call();
      } else {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::tie(gx, gw, gb, gA, gB) = call();
      }
      release_xa();
    }
    // Forward arguments: x, weight, bias, lora_A, lora_B, scale, dropout_p, position, seed, backend.
    if (need_x) out[0] = gx;
    if (need_weight) out[1] = gw;
    if (need_bias) out[2] = gb;
    if (need_A) out[3] = gA;
    if (need_B) out[4] = gB;
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_autograd(const at::Tensor& x, const OptTensor& weight,
                                                   const OptTensor& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scale, double dropout_p,
                                                   c10::string_view dropout_position, const OptTensor& seed,
                                                   c10::string_view backend) {
  const auto requires_grad = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || requires_grad(weight) || requires_grad(bias) || lora_A.requires_grad() ||
        lora_B.requires_grad())) {
    // Nothing to record (inference, decode): straight to the device kernel, without
    // building an autograd node — this is most of the host time of a small decode call.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_op().call(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed, backend);
  }
  auto outputs = LinearFunction::apply(x, weight, bias, lora_A, lora_B, scale, dropout_p,
                                       std::string(dropout_position), seed, std::string(backend));
  return {outputs[0], outputs[1]};
}

TORCH_LIBRARY_IMPL(lora, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("linear_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("post_dropout_grad_y", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_backward_from_grad_xa", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lora
