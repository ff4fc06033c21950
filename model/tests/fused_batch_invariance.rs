//! A request's result must not depend on what else is in its batch (the server batches
//! requests; `pipeline_parity` checks whole edits). Each fused op must therefore give bit-identical
//! results for one sample alone and inside a larger batch.

use candle_core::{Device, Tensor};
use rl4pix_model::ops;

fn same_bits(alone: &Tensor, batched: &Tensor, index: usize, what: &str) {
    let a = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = batched
        .narrow(0, index, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let differing = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differing,
        0,
        "{what}: {differing} of {} values differ",
        a.len()
    );
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

#[test]
fn convolution() {
    for (c_in, c_out, h, w, k, stride, pad) in [
        (8, 16, 24, 40, 3, 1, 1),
        (16, 8, 5, 3, 3, 1, 1),
        (32, 32, 12, 12, 3, 2, 1),
        (64, 32, 17, 9, 1, 1, 0),
    ] {
        let weight = randn(&[c_out, c_in, k, k]);
        let bias = randn(&[c_out]);
        for batch in [3, 9] {
            let x = randn(&[batch, c_in, h, w]);
            let all = ops::conv::conv2d(&x, &weight, Some(&bias), stride, pad).unwrap();
            let one = ops::conv::conv2d(
                &x.narrow(0, 1, 1).unwrap(),
                &weight,
                Some(&bias),
                stride,
                pad,
            )
            .unwrap();
            same_bits(
                &one,
                &all,
                1,
                &format!("conv {c_in}->{c_out} {h}x{w} k{k} batch {batch}"),
            );
        }
    }
}

#[test]
fn attention() {
    for (n, m, heads, d) in [
        (15, 15, 2, 8),
        (15, 77, 2, 8),
        (256, 256, 4, 16),
        (64, 77, 8, 40),
    ] {
        for batch in [3, 9] {
            let q = randn(&[batch, n, heads * d]);
            let k = randn(&[batch, m, heads * d]);
            let v = randn(&[batch, m, heads * d]);
            let all = ops::attention::attention(&q, &k, &v, heads, 0.3).unwrap();
            let pick = |t: &Tensor| t.narrow(0, 1, 1).unwrap();
            let one =
                ops::attention::attention(&pick(&q), &pick(&k), &pick(&v), heads, 0.3).unwrap();
            same_bits(&one, &all, 1, &format!("attention n{n} m{m} batch {batch}"));
        }
    }
}

/// One row per sample, as the time embedding has. (candle's own matmul, which folds the batch
/// into the rows of one product, gives different bits for rows 3 vs 9.)
#[test]
fn token_major_rows_three_versus_nine() {
    let weight = randn(&[64, 16]);
    let bias = randn(&[64]);
    let nine = randn(&[9, 16]);
    let three = nine.narrow(0, 0, 3).unwrap();
    let a = ops::linear::linear(&three, &weight, Some(&bias)).unwrap();
    let b = ops::linear::linear(&nine, &weight, Some(&bias)).unwrap();
    same_bits(&a.narrow(0, 1, 1).unwrap(), &b, 1, "linear rows 3 vs 9");
}

#[test]
fn projections_and_norms() {
    use ops::linear::Channels;
    let weight = randn(&[48, 32]);
    let bias = randn(&[48]);
    let gamma = randn(&[32]);
    let beta = randn(&[32]);
    for batch in [1, 3, 9] {
        for positions in [1, 15, 100] {
            let tokens = randn(&[batch, positions, 32]);
            let map = randn(&[batch, 32, positions]);
            let pick = |t: &Tensor| t.narrow(0, 0, 1).unwrap();
            for (input, x) in [(Channels::Last, &tokens), (Channels::First, &map)] {
                for output in [Channels::Last, Channels::First] {
                    let all = ops::linear::project(x, &weight, Some(&bias), input, output).unwrap();
                    let one = ops::linear::project(&pick(x), &weight, Some(&bias), input, output)
                        .unwrap();
                    same_bits(
                        &one,
                        &all,
                        0,
                        &format!("project {input:?}->{output:?} b{batch} p{positions}"),
                    );
                }
            }
            let all = ops::norm::layer_norm(&tokens, &gamma, &beta, 1e-5).unwrap();
            let one = ops::norm::layer_norm(&pick(&tokens), &gamma, &beta, 1e-5).unwrap();
            same_bits(&one, &all, 0, "layer norm");
            let all = ops::norm::group_norm(&map, &gamma, &beta, 8, 1e-5, true).unwrap();
            let one = ops::norm::group_norm(&pick(&map), &gamma, &beta, 8, 1e-5, true).unwrap();
            same_bits(&one, &all, 0, "group norm");
        }
    }
}
