//! Ops whose forward pass the caller computes with candle's ops on detached tensors, so that
//! none of its intermediates stays alive, attached to the graph by their backward pass alone
//! ([`candle_core::Tensor::attach_op1_arc`] and `attach_op3_arc`, additions of the vendored
//! candle-core, see `vendor/README.md`): only the operands and the result are kept for the
//! backward pass, which computes the operands' gradients with candle's ops on any device.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// The backward pass of an attached op of one operand.
pub(crate) trait Backward1: Send + Sync + 'static {
    /// The op's name in errors.
    fn name(&self) -> &'static str;
    /// The class its backward pass is timed under in a [`moco_core::profile`] scope.
    fn class(&self) -> &'static str;
    /// The operand's gradient from the operand, the result and the result's gradient.
    fn backward(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// The backward pass of an attached op of three operands.
pub(crate) trait Backward3: Send + Sync + 'static {
    /// The op's name in errors.
    fn name(&self) -> &'static str;
    /// The class its backward pass is timed under in a [`moco_core::profile`] scope.
    fn class(&self) -> &'static str;
    /// The operands' gradients from the operands, the result and the result's gradient.
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        operands: [&Tensor; 3],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;
}

/// A [`Backward1`] or [`Backward3`] as a candle custom op. Its forward functions are never
/// called (the result is computed by the caller); the CPU one, which candle requires, says so.
struct Attached<B>(B);

fn forward_not_called(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{name}: an attached op, whose forward pass is computed by the caller"
    ))
}

impl<B: Backward1> CustomOp1 for Attached<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(forward_not_called(self.0.name()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        moco_core::profile::timed(self.0.class(), grad.device(), || {
            self.0.backward(x, res, grad)
        })
    }
}

impl<B: Backward3> CustomOp3 for Attached<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(forward_not_called(self.0.name()))
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed(self.0.class(), grad.device(), || {
            self.0.backward([a1, a2, a3], res, grad)
        })
    }
}

/// `value` (computed from detached tensors) as the result of an op on `x` with backward `b`.
pub(crate) fn attach1(value: &Tensor, x: &Tensor, b: impl Backward1) -> Result<Tensor> {
    value.attach_op1_arc(
        x,
        Arc::new(Box::new(Attached(b)) as Box<dyn CustomOp1 + Send + Sync>),
    )
}

/// `value` (computed from detached tensors) as the result of an op on three operands with
/// backward `b`.
pub(crate) fn attach3(value: &Tensor, operands: [&Tensor; 3], b: impl Backward3) -> Result<Tensor> {
    let [t1, t2, t3] = operands;
    value.attach_op3_arc(
        t1,
        t2,
        t3,
        Arc::new(Box::new(Attached(b)) as Box<dyn CustomOp3 + Send + Sync>),
    )
}

/// A layer of one input and no parameters recomputed in the backward pass: `f` runs on the
/// detached input, so that none of its intermediates stays alive, and its result is attached
/// to the graph as one op whose backward runs `f` again on a copy of the
/// input with a graph of its own and returns that graph's gradient: the same gradient as
/// differentiating `f` in place.
/// `class` names its backward pass in a profile.
pub(crate) fn recomputed(
    x: &Tensor,
    f: fn(&Tensor) -> Result<Tensor>,
    class: &'static str,
) -> Result<Tensor> {
    struct Recompute(fn(&Tensor) -> Result<Tensor>, &'static str);
    impl Backward1 for Recompute {
        fn name(&self) -> &'static str {
            "recomputed"
        }
        fn class(&self) -> &'static str {
            self.1
        }
        fn backward(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let v = candle_core::Var::from_tensor(&x.detach())?;
            let y = (self.0)(v.as_tensor())?;
            let grads = (y * grad.detach())?.sum_all()?.backward()?;
            Ok(grads.get(v.as_tensor()).cloned())
        }
    }
    attach1(&f(&x.detach())?, x, Recompute(f, class))
}
