//! Limited-memory BFGS with a backtracking (Armijo) line search, for smooth convex full-batch objectives
//! such as the L2-regularised softmax regression of a linear probe (scikit-learn's `LogisticRegression`
//! solves the same problem with L-BFGS too). Parameters are one flat `f64` vector.
// Two-loop recursion: Nocedal & Wright, Numerical Optimization (2nd ed.), Algorithm 7.4; line search:
// Algorithm 3.1 with c1 = 1e-4.

use crate::error::Result;

/// Stopping rule and memory of [`minimize`].
#[derive(Debug, Clone, Copy)]
pub struct Lbfgs {
    /// Stop when the largest absolute gradient entry is at most this.
    pub gtol: f64,
    /// Stop after this many iterations (the result then says it did not converge).
    pub max_iter: usize,
    /// Number of correction pairs kept.
    pub memory: usize,
}

impl Default for Lbfgs {
    fn default() -> Self {
        Self {
            gtol: 1e-6,
            max_iter: 1000,
            memory: 10,
        }
    }
}

/// Where [`minimize`] stopped.
#[derive(Debug, Clone, Copy)]
pub struct Minimum {
    pub value: f64,
    pub iterations: usize,
    pub grad_max: f64,
    pub converged: bool,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Minimises `f` from `x` (updated in place). `f(x)` returns the value and the gradient; `progress` is
/// called after every iteration with (iteration, value, largest gradient entry).
pub fn minimize(
    x: &mut [f64],
    cfg: Lbfgs,
    mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>,
    mut progress: impl FnMut(usize, f64, f64),
) -> Result<Minimum> {
    let (mut value, mut grad) = f(x)?;
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let mut iterations = 0;
    while max_abs(&grad) > cfg.gtol && iterations < cfg.max_iter {
        // Search direction -H g by the two-loop recursion.
        let mut q = grad.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(q, y)| *q -= a * y);
            alphas.push(a);
        }
        let gamma = match history.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            // First step: a unit-length move along the steepest descent.
            None => 1.0 / max_abs(&grad).max(1.0),
        };
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - b) * s);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&grad, &dir);
        if slope >= 0.0 {
            // Not a descent direction (lost curvature information): restart from steepest descent.
            history.clear();
            dir = grad.iter().map(|g| -g).collect();
            slope = -dot(&grad, &grad);
        }
        let mut step = 1.0;
        let (new_x, new_value, new_grad) = loop {
            let trial: Vec<f64> = x.iter().zip(&dir).map(|(x, d)| x + step * d).collect();
            let (v, g) = f(&trial)?;
            if v <= value + 1e-4 * step * slope || step < 1e-20 {
                break (trial, v, g);
            }
            step *= 0.5;
        };
        let s: Vec<f64> = new_x.iter().zip(x.iter()).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = new_grad.iter().zip(&grad).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).max(f64::MIN_POSITIVE) {
            if history.len() == cfg.memory {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        let stalled = new_value >= value && step < 1e-20;
        x.copy_from_slice(&new_x);
        value = new_value;
        grad = new_grad;
        iterations += 1;
        progress(iterations, value, max_abs(&grad));
        if stalled {
            break;
        }
    }
    let grad_max = max_abs(&grad);
    Ok(Minimum {
        value,
        iterations,
        grad_max,
        converged: grad_max <= cfg.gtol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimises_an_ill_conditioned_quadratic() {
        // f = sum_i c_i (x_i - i)^2 with condition number 1e4: the minimum is x_i = i.
        let c = [1.0, 10.0, 100.0, 1e4];
        let mut x = vec![0.0; 4];
        let m = minimize(
            &mut x,
            Lbfgs {
                gtol: 1e-9,
                ..Lbfgs::default()
            },
            |x| {
                let v = x
                    .iter()
                    .enumerate()
                    .map(|(i, v)| c[i] * (v - i as f64).powi(2))
                    .sum();
                let g = x
                    .iter()
                    .enumerate()
                    .map(|(i, v)| 2.0 * c[i] * (v - i as f64))
                    .collect();
                Ok((v, g))
            },
            |_, _, _| {},
        )
        .unwrap();
        assert!(m.converged, "{m:?}");
        for (i, v) in x.iter().enumerate() {
            assert!((v - i as f64).abs() < 1e-8, "x[{i}] = {v}");
        }
    }
}
