//! Where a training step's time goes, per op class: [`scope`] runs a closure with a recorder on
//! this thread, and every region timed inside it with [`timed`] (the ops' entry points in
//! moco-models, the trainer's phases here) adds its *exclusive* time (its own, less that of the
//! timed regions inside it) to its class. A region synchronises its device before and after, so
//! on a GPU it measures the region's own work, launches included, but a profiled step loses the
//! overlap of host and device that a normal step has: the classes add up to the profiled step,
//! which is slower than an unprofiled one. Outside a scope, [`timed`] only runs its closure.
//!
//! The scope is explicit and thread-local, as SyncBN's ([`crate::dist::sync_bn::scope`]): code
//! that does not ask for a profile never pays for one.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;

/// One class's total over a scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassTime {
    /// The class (an op or a phase of the step).
    pub class: &'static str,
    /// Exclusive seconds.
    pub seconds: f64,
    /// Timed regions of this class.
    pub calls: u64,
}

/// What a [`scope`] recorded: each class's exclusive time, in first-seen order, and the
/// scope's wall time.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// The classes, in the order they were first timed.
    pub classes: Vec<ClassTime>,
    /// Seconds from the scope's start to its end (its device synchronised).
    pub total: f64,
}

impl Profile {
    /// Seconds of the scope that no timed region accounts for.
    pub fn untimed(&self) -> f64 {
        self.total - self.classes.iter().map(|c| c.seconds).sum::<f64>()
    }
}

#[derive(Default)]
struct Recorder {
    classes: Vec<ClassTime>,
    /// For each timed region open now, the inclusive time of the regions closed inside it.
    open: Vec<f64>,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Runs `f` with a recorder on this thread and returns its result with what was recorded;
/// `device` is synchronised at the end so that the total includes the queued work. Scopes do
/// not nest: an inner one records on its own and the outer one loses those regions.
pub fn scope<R, E: From<candle_core::Error>>(
    device: &Device,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<(R, Profile), E> {
    device.synchronize()?;
    let previous = RECORDER.with(|r| r.borrow_mut().replace(Recorder::default()));
    let t0 = Instant::now();
    let out = f();
    let synced = device.synchronize();
    let total = t0.elapsed().as_secs_f64();
    let recorder = RECORDER.with(|r| std::mem::replace(&mut *r.borrow_mut(), previous));
    let out = out?;
    synced?;
    Ok((
        out,
        Profile {
            classes: recorder.map(|r| r.classes).unwrap_or_default(),
            total,
        },
    ))
}

/// Runs `f`; inside a [`scope`], synchronises `device` before and after and adds `f`'s
/// exclusive time to `class`.
pub fn timed<R, E: From<candle_core::Error>>(
    class: &'static str,
    device: &Device,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<R, E> {
    let active = RECORDER.with(|r| match r.borrow_mut().as_mut() {
        Some(rec) => {
            rec.open.push(0.0);
            true
        }
        None => false,
    });
    if !active {
        return f();
    }
    let started = device.synchronize().map(|()| Instant::now());
    let out = started.map_err(E::from).and_then(|t0| {
        let out = f();
        device.synchronize()?;
        Ok((out, t0.elapsed().as_secs_f64()))
    });
    let inclusive = out.as_ref().map_or(0.0, |(_, dt)| *dt);
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            let inner = rec.open.pop().unwrap_or(0.0);
            if let Some(parent) = rec.open.last_mut() {
                *parent += inclusive;
            }
            let seconds = (inclusive - inner).max(0.0);
            match rec.classes.iter_mut().find(|c| c.class == class) {
                Some(c) => {
                    c.seconds += seconds;
                    c.calls += 1;
                }
                None => rec.classes.push(ClassTime {
                    class,
                    seconds,
                    calls: 1,
                }),
            }
        }
    });
    out?.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sleep_ms(ms: u64) -> candle_core::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok(())
    }

    /// Nested regions count exclusively, repeated ones add up, and nothing is recorded
    /// outside a scope.
    #[test]
    fn nested_regions_are_exclusive_and_outside_a_scope_nothing_is_recorded() {
        let dev = Device::Cpu;
        timed("outside", &dev, || sleep_ms(1)).unwrap();
        let ((), p) = scope(&dev, || -> candle_core::Result<()> {
            timed("outer", &dev, || {
                sleep_ms(20)?;
                timed("inner", &dev, || sleep_ms(30))?;
                timed("inner", &dev, || sleep_ms(30))
            })
        })
        .unwrap();
        let get = |c: &str| p.classes.iter().find(|t| t.class == c).unwrap().clone();
        assert!(p.classes.iter().all(|c| c.class != "outside"));
        let (outer, inner) = (get("outer"), get("inner"));
        assert_eq!((outer.calls, inner.calls), (1, 2));
        // Sleeps last at least what they ask for; the outer region's own time excludes the
        // inner ones' 60 ms.
        assert!(inner.seconds >= 0.060, "{inner:?}");
        assert!(outer.seconds >= 0.020 && outer.seconds < 0.060, "{outer:?}");
        assert!(p.total >= outer.seconds + inner.seconds);
        assert!(p.untimed() >= 0.0 && p.untimed() < p.total);
    }

    /// An error inside a region comes out of it and of the scope, and the recorder is gone.
    #[test]
    fn errors_pass_through_and_the_scope_ends() {
        let dev = Device::Cpu;
        let r = scope(&dev, || -> candle_core::Result<()> {
            timed("failing", &dev, || -> candle_core::Result<()> {
                candle_core::bail!("boom")
            })
        });
        assert!(r.unwrap_err().to_string().contains("boom"));
        assert!(RECORDER.with(|r| r.borrow().is_none()));
    }
}
