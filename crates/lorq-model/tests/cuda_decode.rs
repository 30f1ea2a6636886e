//! The paged KV cache and decode kernels on the GPU against the CPU reference (`attend`, candle's
//! CPU ops, the CPU model) on fresh random inputs: relative L2 error <= 1e-5 in f32, <= 1e-2 in
//! bf16, never NaN; greedy generation of a tiny random Llama on GPU f32 equals the CPU's.
//! Built and run on a GPU machine with `LORQ_CUDA_TESTS="-p lorq-model --test cuda_decode"
//! scripts/build-cuda.sh --tests`; in a CPU build, or where no GPU is found, each test prints why
//! it is skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_decode_tests_skipped_without_the_cuda_feature() {
    eprintln!(
        "SKIPPED: lorq-model was built without the `cuda` feature; the GPU tests run with \
         scripts/build-cuda.sh --tests on a GPU machine"
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, D};
    use lorq_model::attention::{attend, merge_heads, split_heads};
    use lorq_model::paged_kv::BLOCK_SIZE;
    use std::sync::Arc;

    use lorq_lora::LoraAdapter;
    use lorq_model::random_model::{random_adapters, seeded_randn, shape_config};
    use lorq_model::{BatchItem, LayerLinear, LlamaModel, LogitsWanted, ModelConfig};
    use lorq_quant::cuda::fused_ops::{add_rms_norm, embed_rows, silu_mul};
    use lorq_quant::cuda::paged_attention::{
        attention, decode_attention, prefill_attention, prefill_tile_tokens, prefill_tiles,
        rope_append, set_tensor_core_attention, tickets_needed, NewTokens, PageShape, PagedBatch,
    };
    use lorq_quant::cuda::sampling::{
        greedy_rows, prepare_rows, sample_rows, top_rows, RowSampling, RowScores, TOP_MAX,
    };

    /// The GPU, with the lock that runs this binary's GPU tests one at a time: the attention
    /// test switches the process-wide kernel choice (`set_tensor_core_attention`), and other
    /// tests compare runs of one model bit for bit.
    fn gpu() -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let dev = lorq_quant::cuda::usable_gpu(0)
            .map_err(|why| eprintln!("SKIPPED: {why}"))
            .ok()?;
        // A failed test poisons the lock; the next ones still run.
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        Some((dev, guard))
    }

    /// `f` run with the FMA attention kernels (the process-wide switch), the tensor-core ones
    /// switched back on after it.
    fn with_fma_attention<R>(f: impl FnOnce() -> R) -> R {
        set_tensor_core_attention(false);
        let r = f();
        set_tensor_core_attention(true);
        r
    }

    /// Every value of `t` as f32 on the host.
    fn host_f32(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A drawn token `id` is kept by the host's distribution `probs` and its interval of the host's
    /// cumulative distribution holds `u` (to 1e-4: the host's f32 sums over 128k values).
    fn assert_in_host_interval(probs: &[f32], id: usize, u: f32, what: &str) {
        assert!(
            id < probs.len() && probs[id] > 0.0,
            "{what}: {id} not kept by the host"
        );
        let before: f32 = probs[..id].iter().sum();
        assert!(
            u >= before - 1e-4 && u < before + probs[id] + 1e-4,
            "{what}: u outside token {id}'s host interval [{before}, {})",
            before + probs[id]
        );
    }

    /// `t` in `dtype` on `dev`.
    fn gpu_tensor(t: Tensor, dtype: DType, dev: &Device) -> Tensor {
        t.to_dtype(dtype).unwrap().to_device(dev).unwrap()
    }

    fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
        let (g, w) = (host_f32(got), host_f32(want));
        assert_eq!(g.len(), w.len());
        assert!(g.iter().all(|v| v.is_finite()), "non-finite GPU output");
        let num: f64 = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum();
        let den: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum();
        (num / den).sqrt()
    }

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(seeded_randn(seed, n, 1.0, 1), shape, &Device::Cpu).unwrap()
    }

    /// RoPE tables `[positions, hd/2]` (f32 angles, as the model builds them).
    fn rope_tables(positions: usize, hd: usize) -> (Tensor, Tensor) {
        let half = hd / 2;
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for p in 0..positions {
            for i in 0..half {
                let f = 1.0 / 10000f32.powf((2 * i) as f32 / hd as f32);
                c.push((f * p as f32).cos());
                s.push((f * p as f32).sin());
            }
        }
        (
            Tensor::from_vec(c, (positions, half), &Device::Cpu).unwrap(),
            Tensor::from_vec(s, (positions, half), &Device::Cpu).unwrap(),
        )
    }

    /// One sequence of a kernel test: `total` tokens, the last `new` of them new this step.
    #[derive(Clone)]
    struct Seq {
        total: usize,
        new: usize,
    }

    /// RoPE + append + attention of a batch of sequences (mixed prefill and decode) against the
    /// CPU `attend` per sequence; blocks handed out in a scrambled order.
    #[allow(clippy::too_many_arguments)]
    fn check_attention(
        dev: &Device,
        dtype: DType,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        window: Option<usize>,
        seqs: &[Seq],
        tol: f64,
        seed: u64,
    ) {
        let shape = PageShape {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: BLOCK_SIZE,
        };
        let blocks_per: Vec<usize> = seqs.iter().map(|s| s.total.div_ceil(BLOCK_SIZE)).collect();
        let num_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
        // Scrambled block ids: sequence i's j-th block is ids[...] (a fixed permutation).
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in 0..ids.len() {
            let j = (i * 7919 + 13) % ids.len();
            ids.swap(i, j);
        }
        let max_blocks = *blocks_per.iter().max().unwrap();
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        let mut at = 0;
        for (i, &b) in blocks_per.iter().enumerate() {
            for j in 0..b {
                tables[i * max_blocks + j] = ids[at];
                at += 1;
            }
        }
        let max_total = seqs.iter().map(|s| s.total).max().unwrap();
        let (cos, sin) = rope_tables(max_total, hd);
        let round = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        // The cached (already rotated) keys and values, written into host pages.
        let page_len = num_blocks * kv_heads * BLOCK_SIZE * hd;
        let (mut kp, mut vp) = (vec![0f32; page_len], vec![0f32; page_len]);
        let mut refs = Vec::new(); // per sequence: (q new, k new, v new, k old, v old)
        let (mut row_pos, mut row_seq, mut row_slot) = (vec![], vec![], vec![]);
        for (i, s) in seqs.iter().enumerate() {
            let old = s.total - s.new;
            let sd = seed + 100 * i as u64;
            let k_old = round(&randn(sd, &[kv_heads, old, hd]));
            let v_old = round(&randn(sd + 1, &[kv_heads, old, hd]));
            let q = round(&randn(sd + 2, &[s.new, heads * hd]));
            let k = round(&randn(sd + 3, &[s.new, kv_heads * hd]));
            let v = round(&randn(sd + 4, &[s.new, kv_heads * hd]));
            let ko: Vec<f32> = k_old.flatten_all().unwrap().to_vec1().unwrap();
            let vo: Vec<f32> = v_old.flatten_all().unwrap().to_vec1().unwrap();
            let slot = |p: usize| {
                tables[i * max_blocks + p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE
            };
            for h in 0..kv_heads {
                for p in 0..old {
                    let sl = slot(p);
                    let dst =
                        ((sl / BLOCK_SIZE * kv_heads + h) * BLOCK_SIZE + sl % BLOCK_SIZE) * hd;
                    let src = (h * old + p) * hd;
                    kp[dst..dst + hd].copy_from_slice(&ko[src..src + hd]);
                    vp[dst..dst + hd].copy_from_slice(&vo[src..src + hd]);
                }
            }
            for p in old..s.total {
                row_pos.push(p as u32);
                row_seq.push(i as u32);
                row_slot.push(slot(p) as u32);
            }
            refs.push((q, k, v, k_old, v_old));
        }
        let rows = row_pos.len();
        let up = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
        // Per sequence: its new q, k, v and its cached k, v.
        type SeqTensors = (Tensor, Tensor, Tensor, Tensor, Tensor);
        let cat = |f: &dyn Fn(&SeqTensors) -> Tensor| {
            let parts: Vec<Tensor> = refs.iter().map(f).collect();
            up(&Tensor::cat(&parts, 0).unwrap())
        };
        let q_g = cat(&|r| r.0.clone());
        let k_g = cat(&|r| r.1.clone());
        let v_g = cat(&|r| r.2.clone());
        let page_shape = (num_blocks, kv_heads, BLOCK_SIZE, hd);
        let pages = |p: &[f32]| up(&Tensor::from_slice(p, page_shape, &Device::Cpu).unwrap());
        let (kc, vc) = (pages(&kp), pages(&vp));
        let u32s = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, n, dev).unwrap()
        };
        let (pos_t, seq_t, slot_t) = (u32s(row_pos), u32s(row_seq), u32s(row_slot));
        let tables_t = u32s(tables).reshape((seqs.len(), max_blocks)).unwrap();
        let max_keys = seqs
            .iter()
            .map(|s| window.map_or(s.total, |w| w.min(s.total)))
            .max()
            .unwrap();
        let batch = PagedBatch {
            row_pos: &pos_t,
            row_seq: &seq_t,
            row_slot: &slot_t,
            block_tables: &tables_t,
            max_keys,
            // Few SMs make the kernel split long contexts: both paths get exercised.
            sms: if seed.is_multiple_of(2) { 132 } else { 1 },
            tickets: None,
        };
        let (cos_g, sin_g) = (up(&cos), up(&sin));
        let new = NewTokens {
            q: &q_g,
            k: &k_g,
            v: &v_g,
            cos: &cos_g,
            sin: &sin_g,
        };
        let q_rot = rope_append(new, &batch, &kc, &vc, shape).unwrap();
        // The split merged by a second launch, then in the same launch (tickets), twice with the
        // same tickets (each launch must leave them zeroed): the same merge, bit for bit.
        let out = attention(&q_rot, &kc, &vc, &batch, shape, window).unwrap();
        // 16-bit caches take the tensor-core kernels (the default); the FMA kernels must agree
        // with the CPU as well (the switch is process-wide: both must be right for any test).
        let tensor_cores = dtype != DType::F32;
        let fma_out = tensor_cores.then(|| {
            with_fma_attention(|| attention(&q_rot, &kc, &vc, &batch, shape, window)).unwrap()
        });
        let tickets =
            Tensor::zeros(tickets_needed(rows, heads, kv_heads), DType::U32, dev).unwrap();
        let fused = PagedBatch {
            tickets: Some(&tickets),
            ..batch
        };
        for round in 0..2 {
            let one = attention(&q_rot, &kc, &vc, &fused, shape, window).unwrap();
            let diff = max_abs_diff(&one, &out);
            assert_eq!(
                diff, 0.0,
                "merged in one launch (round {round}) != two launches"
            );
        }
        let left: u32 = tickets.to_vec1::<u32>().unwrap().iter().sum();
        assert_eq!(left, 0, "the attention left {left} tickets taken");
        if seqs.iter().all(|s| s.new == 1) {
            // A decode step: RoPE, append and attention in one launch, on pages without the new
            // tokens, must give rope_append + attention's output and pages, bit for bit.
            let (kc1, vc1) = (pages(&kp), pages(&vp));
            let one = decode_attention(new, &fused, &kc1, &vc1, shape, window).unwrap();
            let same = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) == 0.0;
            assert!(
                same(&one, &out),
                "decode_attention != rope_append + attention"
            );
            assert!(
                same(&kc1, &kc) && same(&vc1, &vc),
                "decode_attention appended other pages"
            );
            if tensor_cores {
                // The FMA kernels append the same pages; their outputs are checked below.
                let (kc2, vc2) = (pages(&kp), pages(&vp));
                let fma =
                    with_fma_attention(|| decode_attention(new, &fused, &kc2, &vc2, shape, window));
                let e = rel_l2(&fma.unwrap(), &one);
                assert!(
                    e <= tol,
                    "FMA decode_attention vs tensor cores: rel err {e} > {tol}"
                );
                assert!(
                    same(&kc2, &kc1) && same(&vc2, &vc1),
                    "FMA decode_attention appended other pages"
                );
            }
        }
        // CPU reference, sequence by sequence, in f32.
        let mut want = Vec::new();
        for (s, (q, k, v, k_old, v_old)) in seqs.iter().zip(&refs) {
            let old = s.total - s.new;
            let c = cos.narrow(0, old, s.new).unwrap();
            let sn = sin.narrow(0, old, s.new).unwrap();
            let rot = |x: &Tensor, h: usize| {
                let x = split_heads(x, h, hd).unwrap().unsqueeze(0).unwrap();
                candle_nn::rotary_emb::rope(&x, &c, &sn)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
            };
            let qr = rot(q, heads);
            let kr = rot(k, kv_heads);
            let vs = split_heads(v, kv_heads, hd).unwrap();
            let k_all = Tensor::cat(&[k_old, &kr], 1).unwrap();
            let v_all = Tensor::cat(&[v_old, &vs], 1).unwrap();
            want.push(merge_heads(&attend(&qr, &k_all, &v_all, window).unwrap()).unwrap());
        }
        let want = Tensor::cat(&want, 0).unwrap();
        assert_eq!(out.dims(), [rows, heads * hd]);
        let e = rel_l2(&out, &want);
        eprintln!(
            "paged attention {dtype:?} heads {heads}/{kv_heads} hd {hd} window {window:?} \
             {} seqs, {rows} rows: rel err {e:.2e}",
            seqs.len()
        );
        assert!(e <= tol, "rel err {e} > {tol}");
        if let Some(fma) = fma_out {
            let e = rel_l2(&fma, &want);
            eprintln!("  FMA kernels: rel err {e:.2e}");
            assert!(e <= tol, "FMA kernels: rel err {e} > {tol}");
        }
        // The query-tile kernel (16-bit caches, head dims 64 and 128) over the same pages: every
        // sequence's new rows in tiles, decode rows as one-row tiles.
        match prefill_tile_tokens(dtype, shape) {
            Some(tokens) => {
                let mut first = 0;
                let runs: Vec<(usize, usize)> = seqs
                    .iter()
                    .map(|s| {
                        first += s.new;
                        (first - s.new, s.new)
                    })
                    .collect();
                let tiles = u32s(prefill_tiles(runs, tokens));
                let tiled =
                    prefill_attention(&q_rot, &kc, &vc, &batch, &tiles, shape, window).unwrap();
                let e = rel_l2(&tiled, &want);
                eprintln!("  query tiles of {tokens} tokens: rel err {e:.2e}");
                assert!(e <= tol, "query tiles: rel err {e} > {tol}");
                let e = rel_l2(&tiled, &out);
                assert!(
                    e <= tol,
                    "query tiles vs one block a row: rel err {e} > {tol}"
                );
            }
            None => eprintln!("  query tiles: no kernel for {dtype:?} hd {hd} (one block a row)"),
        }
    }

    /// The largest absolute difference of two tensors of one shape (any dtype, any device).
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn mixed_batch() -> Vec<Seq> {
        vec![
            Seq { total: 1, new: 1 },
            Seq { total: 37, new: 1 },
            Seq { total: 300, new: 1 },
            Seq { total: 700, new: 1 },
            Seq { total: 45, new: 45 },
            Seq { total: 90, new: 20 },
            Seq {
                total: 333,
                new: 130,
            },
            Seq { total: 17, new: 1 },
        ]
    }

    #[test]
    fn paged_attention_matches_cpu_attend() {
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let mut seed = 1;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            for &(heads, kv_heads, hd) in &[
                (8usize, 2usize, 64usize),
                (32, 8, 128),
                (9, 3, 64),
                (4, 4, 128),
                (20, 2, 64),
                (4, 1, 256),
            ] {
                for window in [None, Some(40)] {
                    // Only decode rows: also through decode_attention.
                    let decode: Vec<Seq> =
                        mixed_batch().into_iter().filter(|s| s.new == 1).collect();
                    for split in [0, 1] {
                        for (seqs, offset) in [(mixed_batch(), 0), (decode.clone(), 1000)] {
                            check_attention(
                                &dev,
                                dtype,
                                heads,
                                kv_heads,
                                hd,
                                window,
                                &seqs,
                                tol,
                                seed * 2 + split + offset,
                            );
                        }
                    }
                    seed += 1;
                }
            }
        }
        // Many decode sequences of different lengths in one launch.
        let many: Vec<Seq> = (0..40)
            .map(|i| Seq {
                total: 1 + (i * 37) % 600,
                new: 1,
            })
            .collect();
        check_attention(&dev, DType::F32, 32, 8, 128, None, &many, 1e-5, 99);
        check_attention(&dev, DType::BF16, 32, 8, 128, Some(100), &many, 1e-2, 98);
    }

    #[test]
    fn fused_ops_match_candle_cpu() {
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            for &(rows, hidden) in &[(1usize, 4096usize), (33, 576), (5, 100), (2, 10000)] {
                let round = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let x = round(randn(1, &[rows, hidden]));
                let d = round(randn(2, &[rows, hidden]));
                let w = round(randn(3, &[hidden]).affine(0.1, 1.0).unwrap());
                let up = |t: &Tensor| gpu_tensor(t.clone(), dtype, &dev);
                let (s, y) = add_rms_norm(&up(&x), &up(&d), &up(&w), 1e-5).unwrap();
                let s_want = (&x + &d).unwrap();
                let y_want = candle_nn::ops::rms_norm(&s_want, &w, 1e-5).unwrap();
                let (es, ey) = (rel_l2(&s, &s_want), rel_l2(&y, &y_want));
                eprintln!("add_rms_norm {dtype:?} [{rows}, {hidden}]: {es:.2e} {ey:.2e}");
                assert!(es <= tol && ey <= tol, "add_rms_norm: {es} {ey} > {tol}");
                // The embedding lookup: rows of x picked by ids, the past-vocabulary id zero.
                let ids: Vec<u32> = (0..rows as u32 + 2)
                    .map(|i| (i * 7) % rows as u32)
                    .collect();
                let mut with_bad = ids.clone();
                with_bad.push(rows as u32);
                let got =
                    embed_rows(&up(&x), &Tensor::new(with_bad.as_slice(), &dev).unwrap()).unwrap();
                let want = x
                    .to_dtype(dtype)
                    .unwrap()
                    .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
                    .unwrap();
                let got_cpu = got.to_device(&Device::Cpu).unwrap();
                assert_eq!(
                    got_cpu
                        .narrow(0, 0, ids.len())
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap(),
                    want.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                    "embed_rows {dtype:?} [{rows}, {hidden}]"
                );
                let last: Vec<f32> = got_cpu
                    .get(ids.len())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(
                    last.iter().all(|&v| v == 0.0),
                    "an id past the table gives a zero row"
                );
                let g = round(randn(4, &[rows, hidden]));
                let u = round(randn(5, &[rows, hidden]));
                let got = silu_mul(&up(&g), &up(&u)).unwrap();
                let want = (g.silu().unwrap() * &u).unwrap();
                let e = rel_l2(&got, &want);
                eprintln!("silu_mul {dtype:?} [{rows}, {hidden}]: {e:.2e}");
                assert!(e <= tol, "silu_mul: {e} > {tol}");
            }
        }
        // Greedy picks on the GPU = the CPU sampler's: the argmax (first index on ties, NaN
        // never wins) and its log-softmax, at a vocabulary size past one thread's loads, with
        // values rounded to bf16 (many ties), rows the vector loads take (n % 8 == 0) and rows
        // they do not, and a selection that skips and repeats rows.
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(rows, n) in &[(1usize, 128_256usize), (5, 1000), (4, 49_152), (3, 7)] {
                let x = randn(6, &[rows, n]).to_dtype(dtype).unwrap();
                let mut host = host_f32(&x);
                // A NaN in row 0 (never the answer) and an exact tie for the maximum in the last row.
                host[1] = f32::NAN;
                let last = &mut host[(rows - 1) * n..];
                let m = lorq_model::sampling::argmax(last);
                last[n - 1] = last[m];
                let x = Tensor::from_vec(host.clone(), (rows, n), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let host = host_f32(&x);
                let sel: Vec<u32> = (0..rows as u32).rev().chain([rows as u32 - 1]).collect();
                let got = greedy_rows(&x, &sel).unwrap();
                assert_eq!(got.len(), sel.len());
                for (p, &r) in got.iter().zip(&sel) {
                    let row = &host[r as usize * n..(r as usize + 1) * n];
                    let no_nan: Vec<f32> = row
                        .iter()
                        .map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v })
                        .collect();
                    let want = lorq_model::sampling::argmax(&no_nan);
                    assert_eq!(
                        p.id as usize, want,
                        "greedy_rows {dtype:?} [{rows}, {n}] row {r}"
                    );
                    if row.iter().any(|v| v.is_nan()) {
                        assert!(p.logprob.is_nan(), "a row with NaN has no log-softmax");
                    } else {
                        let lp = lorq_model::sampling::log_softmax_at(row, want);
                        assert!(
                            (p.logprob - lp).abs() <= 1e-4 * lp.abs().max(1.0),
                            "greedy_rows {dtype:?} [{rows}, {n}] row {r}: log-softmax {} vs {lp}",
                            p.logprob
                        );
                    }
                }
                let e = greedy_rows(&x, &[rows as u32]).unwrap_err().to_string();
                assert!(
                    e.contains(&format!("row {rows} selected from {rows} rows")),
                    "{e}"
                );
            }
        }
    }

    /// Tokens drawn on the GPU = the host sampler's distribution inverted at the same uniform
    /// number: temperature, top-k (ties kept) and top-p (ties by index), alone and together, on
    /// flat and peaked rows of 1000 to 128,256 values in f32 and bf16 (bf16: many exact ties).
    /// Every device token must hold u in its host CDF interval to 1e-4 (the host sampler's own
    /// f32 sums are off by ~1e-5 over 128k flat values), 99 % must be the token of the same
    /// draw computed in f64, and the log-probabilities agree with f64's to 1e-3.
    #[test]
    fn device_draws_match_the_host_sampler() {
        use lorq_model::sampling::{Sampler, SamplingParams};
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let settings: [(f32, Option<usize>, f32); 7] = [
            (1.0, None, 1.0),
            (0.7, None, 0.9),
            (1.3, Some(50), 1.0),
            (0.8, Some(40), 0.95),
            (1.0, Some(1), 1.0),
            (0.5, None, 0.5),
            (2.0, Some(1000), 0.99),
        ];
        let us = [0.0f32, 0.013, 0.25, 0.5, 0.77, 0.999];
        let (mut cases, mut same, mut same_f32) = (0, 0, 0);
        for dtype in [DType::F32, DType::BF16] {
            for &(n, scale) in &[(1000usize, 1.0f64), (49_152, 4.0), (128_256, 2.5)] {
                let x = gpu_tensor((randn(9, &[3, n]) * scale).unwrap(), dtype, &dev);
                let host = host_f32(&x);
                for (row, r) in host.chunks(n).enumerate() {
                    for &(t, k, p) in &settings {
                        let params = SamplingParams {
                            do_sample: true,
                            temperature: Some(t),
                            top_k: k,
                            top_p: Some(p),
                            ..Default::default()
                        };
                        let probs = Sampler::new(params).probabilities(r, &[]);
                        let scores: Vec<f64> = r.iter().map(|&v| (v / t) as f64).collect();
                        let top = scores
                            .iter()
                            .zip(&probs)
                            .filter(|(_, &q)| q > 0.0)
                            .map(|(&s, _)| s)
                            .fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = scores
                            .iter()
                            .zip(&probs)
                            .map(|(&s, &q)| if q > 0.0 { (s - top).exp() } else { 0.0 })
                            .collect();
                        let z: f64 = w.iter().sum();
                        let exact_probs: Vec<f64> = w.iter().map(|&v| v / z).collect();
                        let args: Vec<RowSampling> = us
                            .iter()
                            .map(|&u| RowSampling {
                                row: row as u32,
                                penalty: 1.0,
                                penalized: &[],
                                temperature: t,
                                top_k: k.map(|k| k as u32),
                                top_p: p,
                                u,
                            })
                            .collect();
                        let got = sample_rows(&x, &args).unwrap();
                        for (g, &u) in got.iter().zip(&us) {
                            let want = lorq_model::sampling::invert(&probs, u);
                            // The host's f32 softmax over 128k flat scores is off by ~1e-5 (its
                            // f32 sums); the exact reference: the host's kept tokens, their
                            // scores (x / t in f32, as both divide), softmax and draw in f64.
                            let mut acc = 0f64;
                            let exact = exact_probs
                                .iter()
                                .position(|&q| {
                                    acc += q;
                                    (u as f64) < acc && q > 0.0
                                })
                                .unwrap_or(want.id as usize);
                            let what = format!(
                                "{dtype:?} n {n} row {row} t {t} k {k:?} p {p} u {u}: device {} host {}",
                                g.id, want.id
                            );
                            let id = g.id as usize;
                            assert_in_host_interval(&probs, id, u, &what);
                            assert!(
                                (g.logprob as f64 - exact_probs[id].ln()).abs() <= 1e-3,
                                "{what}: log-probability {} vs {}",
                                g.logprob,
                                exact_probs[id].ln()
                            );
                            if g.id as usize != exact {
                                let before: f32 = probs[..id].iter().sum();
                                eprintln!(
                                    "{what}: p(device) {:e} p(host) {:e}, host interval of the \
                                     device's token [{before}, {})",
                                    probs[id],
                                    probs[want.id as usize],
                                    before + probs[id]
                                );
                            }
                            cases += 1;
                            same += (g.id as usize == exact) as usize;
                            same_f32 += (g.id == want.id) as usize;
                        }
                    }
                }
            }
        }
        eprintln!(
            "device draws: {same} of {cases} the exact inversion's token, {same_f32} the host \
             sampler's (its f32 running sum)"
        );
        assert!(same * 100 >= cases * 99, "{same} of {cases} draws agree");
        let e = sample_rows(
            &randn(1, &[2, 10]).to_device(&dev).unwrap(),
            &[RowSampling {
                row: 0,
                penalty: 1.0,
                penalized: &[],
                temperature: 0.0,
                top_k: None,
                top_p: 1.0,
                u: 0.5,
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("temperature must be > 0"), "{e}");
    }

    /// Alternatives on the GPU = the host's `top_logprobs`: the same tokens in the same order
    /// (bf16 and f16 rows hold many exact ties: the smaller index first, at the cut too), and
    /// log-probabilities within 1e-4 relative (f32 sums in another order); rows with -inf, a whole row
    /// asked for, rows picked twice.
    #[test]
    fn device_alternatives_match_the_host() {
        use lorq_model::generation::top_logprobs;
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let mut checked = 0;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &n in &[7usize, 1000, 128_256] {
                let mut host = seeded_randn(12, 3 * n, 2.0, 1);
                host[1] = f32::NEG_INFINITY;
                host[n + 2] = f32::NEG_INFINITY;
                let x = gpu_tensor(
                    Tensor::from_vec(host, (3, n), &Device::Cpu).unwrap(),
                    dtype,
                    &dev,
                );
                let host = host_f32(&x);
                let counts = [1usize, 5, 20, TOP_MAX, n];
                let rows: Vec<(u32, usize)> = counts
                    .iter()
                    .enumerate()
                    .filter(|&(_, &c)| c <= TOP_MAX.min(n))
                    .map(|(j, &c)| ((j % 3) as u32, c))
                    .chain([(0, 3)])
                    .collect();
                let got = top_rows(&x, &rows).unwrap();
                assert_eq!(got.len(), rows.len());
                for (&(row, count), picks) in rows.iter().zip(&got) {
                    let r = row as usize;
                    let want = top_logprobs(&host[r * n..(r + 1) * n], count);
                    let what = format!("{dtype:?} n {n} row {row} count {count}");
                    let ids: Vec<u32> = picks.iter().map(|p| p.id).collect();
                    let want_ids: Vec<u32> = want.iter().map(|s| s.id).collect();
                    assert_eq!(ids, want_ids, "{what}");
                    for (p, w) in picks.iter().zip(&want) {
                        assert!(
                            p.logprob == w.logprob
                                || (p.logprob - w.logprob).abs() <= 1e-4 * w.logprob.abs().max(1.0),
                            "{what}: token {}: {} vs {}",
                            p.id,
                            p.logprob,
                            w.logprob
                        );
                    }
                    checked += 1;
                }
            }
        }
        eprintln!("alternatives: {checked} rows = the host's top_logprobs");
        let x = randn(1, &[2, 10]).to_device(&dev).unwrap();
        for (rows, says) in [
            (
                vec![(0, 0)],
                "row 0: 0 alternatives (1 to 10 for rows of 10)",
            ),
            (vec![(1, 11)], "row 1: 11 alternatives"),
            (vec![(2, 1)], "row 2 selected from 2 rows"),
        ] {
            let e = top_rows(&x, &rows).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    /// Timing, not a check: microseconds per call (launch, kernel, the picks' copy back) of each
    /// picking kernel on 128,256-value bf16 rows, 1 / 16 / 64 rows, a flat distribution (a random
    /// model's: every score near 0) and a peaked one (spread scores, a few far ahead).
    #[test]
    #[ignore = "timing benchmark: run on a GPU with --ignored --nocapture"]
    fn picking_kernel_timing() {
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let n = 128_256usize;
        let time = |f: &mut dyn FnMut()| {
            for _ in 0..3 {
                f();
            }
            let t = std::time::Instant::now();
            for _ in 0..20 {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / 20.0
        };
        for (label, std) in [("flat", 0.5f32), ("peaked", 2.5)] {
            for rows in [1usize, 16, 64] {
                let mut v = seeded_randn(13, rows * n, std, 4);
                if label == "peaked" {
                    for r in 0..rows {
                        for j in 0..5 {
                            v[r * n + (r * 7919 + j * 104_729) % n] += 12.0 - j as f32;
                        }
                    }
                }
                let x = Tensor::from_vec(v, (rows, n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap();
                let sel: Vec<u32> = (0..rows as u32).collect();
                let draw = |t: f32, k: Option<u32>, p: f32| -> Vec<RowSampling> {
                    sel.iter()
                        .map(|&row| RowSampling {
                            row,
                            penalty: 1.0,
                            penalized: &[],
                            temperature: t,
                            top_k: k,
                            top_p: p,
                            u: 0.37,
                        })
                        .collect()
                };
                let (top_p, top_k, plain) = (
                    draw(0.7, None, 0.9),
                    draw(0.7, Some(50), 1.0),
                    draw(1.0, None, 1.0),
                );
                let context: Vec<u32> = (0..512u32).map(|i| i * 211 % n as u32).collect();
                let pen: Vec<RowScores> = sel
                    .iter()
                    .map(|&row| RowScores {
                        row,
                        penalty: 1.1,
                        temperature: 1.0,
                        penalized: &context,
                    })
                    .collect();
                let tops: Vec<(u32, usize)> = sel.iter().map(|&r| (r, 5)).collect();
                let us = [
                    ("greedy", time(&mut || drop(greedy_rows(&x, &sel).unwrap()))),
                    (
                        "t 0.7 top-p 0.9",
                        time(&mut || drop(sample_rows(&x, &top_p).unwrap())),
                    ),
                    (
                        "t 0.7 top-k 50",
                        time(&mut || drop(sample_rows(&x, &top_k).unwrap())),
                    ),
                    (
                        "t 1 uncut",
                        time(&mut || drop(sample_rows(&x, &plain).unwrap())),
                    ),
                    (
                        "penalty (512 tokens) + greedy",
                        time(&mut || {
                            let p = prepare_rows(&x, &pen).unwrap();
                            drop(greedy_rows(&p, &sel).unwrap())
                        }),
                    ),
                    (
                        "top 5 alternatives",
                        time(&mut || drop(top_rows(&x, &tops).unwrap())),
                    ),
                ];
                for (what, us) in us {
                    eprintln!("picking timing: {label} rows {rows}: {what}: {us:.1} us");
                }
            }
        }
    }

    /// The repetition penalty and temperature on the GPU (`prepare_rows`, many blocks per row) =
    /// the host sampler's, bit for bit (f32/bf16/f16 logits; tokens repeated, past the row, none;
    /// penalties above and below 1; rows picked out of order and twice), and the greedy picks from
    /// the penalized rows and the draws with a penalty = the host sampler's with that context: the
    /// same greedy token, a drawn token whose host CDF interval holds u.
    #[test]
    fn device_penalties_match_the_host_sampler() {
        use lorq_model::sampling::{apply_repetition_penalty, argmax, Sampler, SamplingParams};
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let penalties = [1.3f32, 2.0, 1.1, 0.7];
        let mut draws = 0;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &n in &[1000usize, 128_256] {
                let x = gpu_tensor((randn(11, &[4, n]) * 3.0).unwrap(), dtype, &dev);
                let host = host_f32(&x);
                let row_of = |r: usize| &host[r * n..(r + 1) * n];
                let contexts: Vec<Vec<u32>> = (0..4)
                    .map(|r| {
                        let best = argmax(row_of(r)) as u32;
                        match r {
                            0 => vec![],
                            1 => vec![best, best, 5, n as u32, 7, 5, u32::MAX],
                            2 => (0..3000u32)
                                .map(|i| (i * 37) % n as u32)
                                .chain([best])
                                .collect(),
                            _ => vec![best, 0, 1, 2],
                        }
                    })
                    .collect();
                let sel = [3usize, 1, 2, 0, 1];
                let prepare = |temperature: f32| {
                    let args: Vec<RowScores> = sel
                        .iter()
                        .map(|&r| RowScores {
                            row: r as u32,
                            penalty: penalties[r],
                            temperature,
                            penalized: &contexts[r],
                        })
                        .collect();
                    prepare_rows(&x, &args).unwrap()
                };
                let (got, scaled) = (prepare(1.0), prepare(0.8));
                assert_eq!(got.dims(), &[sel.len(), n]);
                let (got_host, scaled_host) = (host_f32(&got), host_f32(&scaled));
                for (j, &r) in sel.iter().enumerate() {
                    let what = format!("{dtype:?} n {n} row {r} (output {j})");
                    let mut want = row_of(r).to_vec();
                    apply_repetition_penalty(&mut want, penalties[r], &contexts[r]);
                    let want_scaled: Vec<f32> = want.iter().map(|&s| s / 0.8).collect();
                    for (got, want, t) in
                        [(&got_host, &want, 1.0), (&scaled_host, &want_scaled, 0.8)]
                    {
                        let differ = got[j * n..(j + 1) * n]
                            .iter()
                            .zip(want)
                            .filter(|(a, b)| a.to_bits() != b.to_bits())
                            .count();
                        assert_eq!(differ, 0, "{what} temperature {t}: {differ} values differ");
                    }
                    let greedy = SamplingParams {
                        repetition_penalty: Some(penalties[r]),
                        ..Default::default()
                    };
                    let want = Sampler::new(greedy).sample(row_of(r), &contexts[r]);
                    let p = greedy_rows(&got, &[j as u32]).unwrap()[0];
                    assert_eq!(p.id, want.id, "{what}: greedy");
                    assert!(
                        (p.logprob - want.logprob).abs() <= 1e-4 * want.logprob.abs().max(1.0),
                        "{what}: greedy log-probability {} vs {}",
                        p.logprob,
                        want.logprob
                    );
                    let sampled = SamplingParams {
                        temperature: Some(0.8),
                        top_p: Some(0.9),
                        repetition_penalty: Some(penalties[r]),
                        ..Default::default()
                    };
                    let probs = Sampler::new(sampled).probabilities(row_of(r), &contexts[r]);
                    for u in [0.0f32, 0.1, 0.5, 0.93] {
                        let d = sample_rows(
                            &x,
                            &[RowSampling {
                                row: r as u32,
                                penalty: penalties[r],
                                penalized: &contexts[r],
                                temperature: 0.8,
                                top_k: None,
                                top_p: 0.9,
                                u,
                            }],
                        )
                        .unwrap()[0];
                        assert_in_host_interval(&probs, d.id as usize, u, &format!("{what} u {u}"));
                        draws += 1;
                    }
                }
            }
        }
        eprintln!("penalized rows: bit-exact; {draws} draws inside the host's intervals");
        let x = randn(1, &[2, 10]).to_device(&dev).unwrap();
        let bad = |penalty: f32, temperature: f32| {
            prepare_rows(
                &x,
                &[RowScores {
                    row: 1,
                    penalty,
                    temperature,
                    penalized: &[1],
                }],
            )
            .unwrap_err()
            .to_string()
        };
        for p in [0.0, -1.0, f32::INFINITY, f32::NAN] {
            let e = bad(p, 1.0);
            assert!(
                e.contains("row 1: the penalty must be > 0 and finite"),
                "{p}: {e}"
            );
            let e = bad(1.0, p);
            assert!(
                e.contains("row 1: the temperature must be > 0 and finite"),
                "{p}: {e}"
            );
        }
    }

    /// Greedy tokens of every sequence (different prompt lengths, one batch, sequence `i` with
    /// adapter `adapters[i]` if any) for `steps` steps, and each step's f32 logits; checks each
    /// step's device greedy picks against the host's argmax and log-softmax of those logits.
    fn generate(
        model: &LlamaModel,
        prompts: &[Vec<u32>],
        adapters: &[Option<Arc<LoraAdapter>>],
        steps: usize,
    ) -> Vec<Vec<(u32, Vec<f32>)>> {
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut out: Vec<Vec<(u32, Vec<f32>)>> = prompts.iter().map(|_| vec![]).collect();
        let mut feed: Vec<Vec<u32>> = prompts.to_vec();
        for _ in 0..steps {
            let mut items: Vec<BatchItem> = caches
                .iter_mut()
                .zip(&feed)
                .enumerate()
                .map(|(i, (c, t))| BatchItem {
                    tokens: t,
                    cache: c,
                    adapter: adapters.get(i).cloned().flatten(),
                    logits: LogitsWanted::Last,
                })
                .collect();
            let logits = model.forward_step(&mut items).unwrap();
            // The batch's greedy picks on the device = the host sampler's on each row.
            let picks = logits.greedy_each().unwrap();
            for (i, p) in picks.iter().enumerate() {
                let v: Vec<f32> = logits
                    .item(i)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let t = lorq_model::sampling::argmax(&v) as u32;
                let lp = lorq_model::sampling::log_softmax_at(&v, t as usize);
                assert_eq!(p.id, t, "sequence {i}: device greedy pick");
                assert!(
                    (p.logprob - lp).abs() <= 1e-4 * lp.abs().max(1.0),
                    "sequence {i}: device log-softmax {} vs host {lp}",
                    p.logprob
                );
                out[i].push((t, v));
                feed[i] = vec![t];
            }
        }
        out
    }

    fn tiny_configs() -> Vec<(&'static str, ModelConfig)> {
        let llama = shape_config("tiny").unwrap();
        let mut mistral = llama.clone();
        mistral.sliding_window = vec![Some(12); mistral.num_hidden_layers];
        // SmolLM2's head layout (9 query heads, 3 KV heads, head_dim 64), two layers.
        let mut smol = shape_config("smollm2-135m").unwrap();
        smol.num_hidden_layers = 2;
        smol.sliding_window = vec![None; 2];
        smol.vocab_size = 1024;
        vec![
            ("tiny llama", llama),
            ("tiny mistral window 12", mistral),
            ("tiny smollm2 heads", smol),
        ]
    }

    fn log_softmax(v: &[f32]) -> Vec<f64> {
        let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        v.iter().map(|&x| x as f64 - z).collect()
    }

    #[test]
    fn tiny_random_models_generate_the_cpu_tokens() {
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        for (name, cfg) in tiny_configs() {
            let prompts: Vec<Vec<u32>> = [5usize, 23, 1, 40]
                .iter()
                .enumerate()
                .map(|(s, &n)| {
                    (0..n)
                        .map(|t| ((s * 131 + t * 17 + 3) % cfg.vocab_size) as u32)
                        .collect()
                })
                .collect();
            let cpu = LlamaModel::random(cfg.clone(), DType::F32, &Device::Cpu, None, 7).unwrap();
            let want = generate(&cpu, &prompts, &[], 32);
            let g32 = LlamaModel::random(cfg.clone(), DType::F32, &dev, None, 7).unwrap();
            assert!(
                g32.kv_pool().is_some(),
                "{name}: the GPU model should page its cache"
            );
            let got = generate(&g32, &prompts, &[], 32);
            for (s, (w, g)) in want.iter().zip(&got).enumerate() {
                for (step, ((wt, wl), (gt, gl))) in w.iter().zip(g).enumerate() {
                    let e = rel_l2(
                        &Tensor::new(gl.as_slice(), &Device::Cpu).unwrap(),
                        &Tensor::new(wl.as_slice(), &Device::Cpu).unwrap(),
                    );
                    assert!(e <= 1e-4, "{name} seq {s} step {step}: logits rel err {e}");
                    if wt != gt {
                        // Only a near tie may flip the greedy token; the sequences part there.
                        let mut sorted = wl.clone();
                        sorted.sort_by(|a, b| b.total_cmp(a));
                        assert!(
                            sorted[0] - sorted[1] < 1e-4,
                            "{name} seq {s} step {step}: GPU token {gt} != CPU token {wt}"
                        );
                        eprintln!("{name} seq {s}: near tie at step {step}, stop comparing");
                        break;
                    }
                }
            }
            eprintln!("{name}: GPU f32 greedy tokens == CPU f32");
            // bf16 on the GPU: logprobs of the CPU's tokens, teacher-forced, within a bound.
            let b16 = LlamaModel::random(cfg.clone(), DType::BF16, &dev, None, 7).unwrap();
            let mut worst = 0f64;
            for (s, p) in prompts.iter().enumerate() {
                let mut seq = p.clone();
                seq.extend(want[s].iter().map(|(t, _)| *t));
                let mut cache = b16.new_cache();
                let logits = b16
                    .forward(&mut [BatchItem {
                        tokens: &seq[..seq.len() - 1],
                        cache: &mut cache,
                        adapter: None,
                        logits: LogitsWanted::All,
                    }])
                    .unwrap()
                    .pop()
                    .unwrap();
                let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
                let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
                for (k, (t, wl)) in want[s].iter().enumerate() {
                    let row = p.len() - 1 + k;
                    let cpu_lp = log_softmax(wl)[*t as usize];
                    worst = worst.max((lp[row][*t as usize] as f64 - cpu_lp).abs());
                }
            }
            eprintln!("{name}: bf16 GPU logprobs of the CPU's tokens within {worst:.3e}");
            assert!(worst < 0.05, "{name}: bf16 logprob error {worst}");
        }
    }

    /// cudarc's per-buffer event tracking off for a test's lifetime: graphs need it off, as
    /// lorq's CLI runs (one stream per GPU). Made before the test's buffers exist; dropping it
    /// turns the tracking back on.
    struct NoEventTracking(Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>);

    impl NoEventTracking {
        fn on(dev: &Device) -> Self {
            let Device::Cuda(cuda) = dev else {
                unreachable!("usable_gpu returns a GPU")
            };
            let ctx = cuda.cuda_stream().context().clone();
            unsafe { ctx.disable_event_tracking() };
            Self(ctx)
        }
    }

    impl Drop for NoEventTracking {
        fn drop(&mut self) {
            unsafe { self.0.enable_event_tracking() };
        }
    }

    /// SmolLM2-135M's layer shapes (576 hidden, 1536 intermediate), two layers, 2048 tokens.
    fn smollm2_two_layers() -> ModelConfig {
        let mut cfg = shape_config("smollm2-135m").unwrap();
        cfg.num_hidden_layers = 2;
        cfg.sliding_window = vec![None; 2];
        cfg.vocab_size = 2048;
        cfg
    }

    /// Decode steps replayed from CUDA graphs compute the eager steps: a batch mixing the base
    /// model and two adapters (whose shrinks the graphs run on a side stream), contexts that
    /// cross a graph's capacity (256 tokens: a second capture), f32 (logits within 1e-5) and
    /// bf16 (1e-2; the attention split differs).
    #[test]
    fn decode_graphs_replay_the_eager_steps() {
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let _events = NoEventTracking::on(&dev);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let mut model =
                LlamaModel::random(shape_config("tiny").unwrap(), dtype, &dev, None, 11).unwrap();
            let adapters = random_adapters(&model, 2, 8, &LayerLinear::ALL).unwrap();
            let assign = [
                None,
                Some(adapters[0].clone()),
                Some(adapters[1].clone()),
                Some(adapters[0].clone()),
            ];
            let prompts: Vec<Vec<u32>> = [250usize, 3, 40, 17]
                .iter()
                .enumerate()
                .map(|(s, &n)| {
                    (0..n)
                        .map(|t| ((s * 37 + t * 11 + 1) % 256) as u32)
                        .collect()
                })
                .collect();
            model.set_cuda_graphs(false);
            let want = generate(&model, &prompts, &assign, 14);
            model.set_cuda_graphs(true);
            assert!(
                model.cuda_graphs(),
                "graphs should be on with event tracking off"
            );
            let forks = lorq_quant::cuda::side_stream::forks_made();
            let got = generate(&model, &prompts, &assign, 14);
            assert!(
                model.captured_cuda_graphs() > 0,
                "{dtype:?}: no decode step ran as a graph"
            );
            // The captured steps ran the LoRA shrinks on the side stream.
            assert!(
                lorq_quant::cuda::side_stream::forks_made() > forks,
                "{dtype:?}: no LoRA shrink was forked onto the side stream"
            );
            let mut worst = 0f64;
            'seqs: for (s, (w, g)) in want.iter().zip(&got).enumerate() {
                for (step, ((wt, wl), (gt, gl))) in w.iter().zip(g).enumerate() {
                    let e = rel_l2(
                        &Tensor::new(gl.as_slice(), &Device::Cpu).unwrap(),
                        &Tensor::new(wl.as_slice(), &Device::Cpu).unwrap(),
                    );
                    assert!(
                        e <= tol && e.is_finite(),
                        "{dtype:?} seq {s} step {step}: graph vs eager logits rel err {e}"
                    );
                    worst = worst.max(e);
                    if wt != gt {
                        let mut sorted = wl.clone();
                        sorted.sort_by(|a, b| b.total_cmp(a));
                        assert!(
                            (sorted[0] - sorted[1]) as f64 <= 4.0 * tol,
                            "{dtype:?} seq {s} step {step}: graph token {gt} != eager {wt}"
                        );
                        continue 'seqs;
                    }
                }
            }
            eprintln!(
                "{dtype:?}: {} graph layouts, logits within {worst:.2e} of the eager steps",
                model.captured_cuda_graphs()
            );
        }
    }

    /// FP8 decode, where the norms and SiLU·mul hand their e4m3 codes to the projections (and
    /// gate/up/down take W8A8 from one row): replayed graphs compute the eager steps (bf16
    /// tolerance, as above), for one row and for five, and the eager steps equal those of the
    /// projections quantizing their inputs themselves. The codes made inside a captured step are the graph's
    /// own buffers: a stale or freed one would show here as garbage logits.
    #[test]
    fn fp8_decode_graphs_replay_the_eager_steps() {
        use lorq_quant::method::QuantMethod;
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let _events = NoEventTracking::on(&dev);
        let cfg = smollm2_two_layers();
        let mut model =
            LlamaModel::random(cfg, DType::BF16, &dev, Some(QuantMethod::Fp8), 5).unwrap();
        for rows in [1usize, 5] {
            let prompts: Vec<Vec<u32>> = (0..rows)
                .map(|s| {
                    (0..3 + 7 * s)
                        .map(|t| ((s * 53 + t * 29 + 1) % 2048) as u32)
                        .collect()
                })
                .collect();
            model.set_cuda_graphs(false);
            let want = generate(&model, &prompts, &[], 8);
            model.set_cuda_graphs(true);
            let got = generate(&model, &prompts, &[], 8);
            assert!(
                model.captured_cuda_graphs() > 0,
                "{rows} rows: no graph ran"
            );
            for (s, (w, g)) in want.iter().zip(&got).enumerate() {
                for (step, ((wt, wl), (gt, gl))) in w.iter().zip(g).enumerate() {
                    let e = rel_l2(
                        &Tensor::new(gl.as_slice(), &Device::Cpu).unwrap(),
                        &Tensor::new(wl.as_slice(), &Device::Cpu).unwrap(),
                    );
                    assert!(
                        e <= 1e-2 && e.is_finite(),
                        "fp8, {rows} rows, seq {s} step {step}: graph vs eager rel err {e}"
                    );
                    if wt != gt {
                        break;
                    }
                }
            }
            eprintln!("fp8, {rows} rows: graph steps == eager steps");
            // The codes the norms and SiLU·mul write are the projections' own quantization of
            // their outputs, bit for bit: without them the eager steps are the same to the bit.
            model.set_cuda_graphs(false);
            model.set_fp8_codes(false);
            let own = generate(&model, &prompts, &[], 8);
            model.set_fp8_codes(true);
            assert!(
                own == want,
                "fp8, {rows} rows: the projections' own quantization changed the logits"
            );
        }
    }

    /// Decode at one row on hqq 4-bit weights in bf16, where the q/k/v and gate/up GEMVs run the
    /// residual add + RMSNorm of their input themselves: the same tokens and logits, bit for bit,
    /// as with the norm's own launch (eager and as graphs), and the heads did run.
    #[test]
    fn norm_heads_decode_as_the_norms_own_launch() {
        use lorq_quant::method::QuantMethod;
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let _events = NoEventTracking::on(&dev);
        let cfg = smollm2_two_layers();
        let mut model =
            LlamaModel::random(cfg, DType::BF16, &dev, Some(QuantMethod::Hqq4), 6).unwrap();
        let prompts: Vec<Vec<u32>> = vec![(0..9).map(|t| ((t * 29 + 1) % 2048) as u32).collect()];
        for graphs in [false, true] {
            model.set_cuda_graphs(graphs);
            model.set_norm_tails(false);
            let before = lorq_quant::cuda::qgemv::norm_head_launches();
            let want = generate(&model, &prompts, &[], 8);
            assert_eq!(lorq_quant::cuda::qgemv::norm_head_launches(), before);
            model.set_norm_tails(true);
            let got = generate(&model, &prompts, &[], 8);
            // Two layers: gate/up of both, q/k/v of the second, per eager step (a captured
            // step launches once, at capture).
            assert!(
                lorq_quant::cuda::qgemv::norm_head_launches() >= before + 3,
                "graphs {graphs}: no norm head ran"
            );
            assert!(got == want, "graphs {graphs}: heads changed the decode");
        }
    }

    #[test]
    fn paged_caches_return_their_blocks() {
        let Some((dev, _one_at_a_time)) = gpu() else {
            return;
        };
        let model =
            LlamaModel::random(shape_config("tiny").unwrap(), DType::F32, &dev, None, 3).unwrap();
        let pool = model.kv_pool().unwrap().clone();
        {
            let mut caches: Vec<_> = (0..5).map(|_| model.new_cache()).collect();
            let prompts: Vec<Vec<u32>> = (0..5).map(|i| vec![1; 10 + 30 * i]).collect();
            let mut items: Vec<BatchItem> = caches
                .iter_mut()
                .zip(&prompts)
                .map(|(c, t)| BatchItem {
                    tokens: t,
                    cache: c,
                    adapter: None,
                    logits: LogitsWanted::Last,
                })
                .collect();
            model.forward(&mut items).unwrap();
            let (cap, free) = pool.usage();
            let used: usize = prompts.iter().map(|p| p.len().div_ceil(BLOCK_SIZE)).sum();
            assert_eq!(cap - free, used);
            assert_eq!(
                caches[4].bytes(),
                130usize.div_ceil(BLOCK_SIZE) * pool.block_bytes()
            );
        }
        let (cap, free) = pool.usage();
        assert_eq!(cap, free, "dropped caches must give every block back");
    }
}
