//! CPU kernels: the row-independent quantized matmul and the small
//! element-wise pieces (RMSNorm, RoPE, SwiGLU).
//!
//! Every output element of [`matmul`] is one dot product between one weight
//! row and one activation row, and each activation row is quantized on its
//! own (`from_float` on that row only). Nothing depends on how many rows are
//! in a call or on which thread computes an element, so a row's result is
//! bit-for-bit the same whether it is computed alone (a decode step) or in a
//! batch (prefill, batched verification). candle's own `QMatMul` does not
//! promise that: on x86 with AVX512-VNNI it switches to repacked kernels
//! (another summation order) when a call has several rows.
//!
//! The dot products for the formats our models use (Q4_1, Q5_0, Q8_0,
//! Q4_K, Q6_K) are our own x86 kernels; the rest are candle's
//! `GgmlType::vec_dot`. Ours take several activation rows against one
//! weight row at once, so that prompt processing and batched verification
//! unpack each weight block once for up to eight rows, and the matmul walks
//! tiles of weight rows by activation rows that stay in L1. Each row's
//! arithmetic is the same instruction sequence whatever the number of rows,
//! so the row-independence above holds bit for bit. Each has an AVX-512
//! VNNI variant besides AVX2 (64 weights per instruction: for the K-quants
//! a fused i16 multiply-accumulate, for the 32-weight formats two blocks
//! per vector and one u8 x i8 dot product), chosen once per process when
//! the CPU has it; Q4_1 is AVX2 only.
//!
//! With AVX-512 VNNI, the Q4_K, Q6_K, Q5_0 and Q8_0 weights are also
//! repacked at load, sixteen rows at a time (module `packed`): one instruction
//! then multiplies four weights of sixteen rows by four broadcast
//! activations, and the lanes are sixteen output columns. Those kernels
//! compute every column in a whole group of sixteen rows, whatever the
//! number of activation rows (decode included), so the row-independence
//! above still holds; a last partial group keeps the row kernels. The
//! packed copy doubles those weights' memory.

use std::ops::Range;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};

use super::DecoderError;

#[cfg(target_arch = "x86_64")]
mod packed;

/// A weight matrix `[n_out, k_in]` in its GGUF block format, with the
/// kernels chosen for that format at load time.
pub struct QWeight {
    tensor: QTensor,
    pub(crate) n_out: usize,
    pub(crate) k_in: usize,
    kernel: Kernel,
    /// The rows in whole groups of sixteen, repacked for the AVX-512
    /// kernels of [`packed`] (which then compute those columns), where the
    /// CPU and format have them. A second copy of those rows' bytes.
    #[cfg(target_arch = "x86_64")]
    packed: Option<packed::Packed>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QWeight({:?}, {}x{})",
            self.dtype(),
            self.n_out,
            self.k_in
        )
    }
}

/// The per-format functions. `act` is the format activations are quantized
/// to (the format's `VecDotType`), which decides which scratch rows a group
/// of weights can share.
#[derive(Clone, Copy)]
struct Kernel {
    act: GgmlDType,
    act_row_bytes: fn(usize) -> usize,
    quantize_row: fn(&[f32], &mut [u8]),
    dot_cols: DotCols,
    dequantize_row: fn(&[u8], &mut [f32]),
    block_bytes: usize,
    block_len: usize,
}

/// `out[r * out_stride + c] = dot(w[c], xq[r])` for `c` in `cols`, every
/// row `r < m`. Unsafe because `out` is written through a raw pointer:
/// callers give disjoint `cols` to concurrent calls.
type DotCols = unsafe fn(&[u8], usize, Range<usize>, &[u8], usize, *mut f32, usize);

/// The dot products a weight format uses: one activation row at a time,
/// and `N` rows against one weight row at once (prompt processing and
/// batched verification), which unpacks each weight block once for all of
/// them. `dot_rows` must give, row for row, the bits `dot` gives: our own
/// kernels run the same per-row instruction sequence for any row count
/// (only the weight unpacking is shared), and the default just calls `dot`.
/// Defaults to candle's; overridden where we have our own.
trait Dot: GgmlType + 'static {
    fn dot(k: usize, w: &[Self], x: &[Self::VecDotType]) -> f32 {
        Self::vec_dot(k, w, x)
    }

    fn dot_rows<const N: usize>(k: usize, w: &[Self], x: [&[Self::VecDotType]; N]) -> [f32; N] {
        x.map(|x| Self::dot(k, w, x))
    }
}

impl Dot for f32 {}
impl Dot for BlockQ4_0 {}
impl Dot for BlockQ5_1 {}
impl Dot for BlockQ2K {}
impl Dot for BlockQ3K {}
impl Dot for BlockQ5K {}

/// A format with an AVX2 kernel `x86::$kernel::<NR>` (`NR` activation rows
/// against one weight row) and optionally an AVX-512 VNNI one, chosen once
/// per process (so every call in a run sums in the same order), falling
/// back to candle's `vec_dot` elsewhere.
macro_rules! own_dot {
    ($block:ty, $kernel:ident $(, $kernel512:ident)?) => {
        impl Dot for $block {
            fn dot(k: usize, w: &[Self], x: &[Self::VecDotType]) -> f32 {
                let n = k / Self::BLCK_SIZE;
                #[cfg(target_arch = "x86_64")]
                {
                    $(if avx512() {
                        // SAFETY: as below, and the CPU has the AVX-512
                        // subsets the kernel enables (checked).
                        return unsafe { x86::$kernel512::<1>(&w[..n], [&x[..n]]) }[0];
                    })?
                    if avx2() {
                        // SAFETY: the CPU has AVX2, FMA and F16C (checked),
                        // the mirrors have candle's layouts (asserted in
                        // `x86`), and the slices are cut to whole blocks of
                        // equal count.
                        return unsafe { x86::$kernel::<1>(&w[..n], [&x[..n]]) }[0];
                    }
                }
                Self::vec_dot(k, w, x)
            }

            fn dot_rows<const N: usize>(
                k: usize,
                w: &[Self],
                x: [&[Self::VecDotType]; N],
            ) -> [f32; N] {
                let n = k / Self::BLCK_SIZE;
                #[cfg(target_arch = "x86_64")]
                {
                    $(if avx512() {
                        // SAFETY: as in `dot`.
                        return unsafe { x86::$kernel512::<N>(&w[..n], x.map(|x| &x[..n])) };
                    })?
                    if avx2() {
                        // SAFETY: as in `dot`.
                        return unsafe { x86::$kernel::<N>(&w[..n], x.map(|x| &x[..n])) };
                    }
                }
                x.map(|x| Self::vec_dot(k, w, x))
            }
        }
    };
}

own_dot!(BlockQ4_1, dot_q4_1_q8_1);
own_dot!(BlockQ5_0, dot_q5_0_q8_0, dot_q5_0_q8_0_512);
own_dot!(BlockQ8_0, dot_q8_0_q8_0, dot_q8_0_q8_0_512);
own_dot!(BlockQ4K, dot_q4k_q8k, dot_q4k_q8k_512);
own_dot!(BlockQ6K, dot_q6k_q8k, dot_q6k_q8k_512);

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// AVX-512 (F, BW, VL) with VNNI on top of AVX2.
/// `BENCH_SUITE_NO_AVX512=1` turns it off, to compare the two kernels.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        avx2()
            && std::env::var_os("BENCH_SUITE_NO_AVX512").is_none_or(|v| v.is_empty() || v == "0")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// Whether this process runs the AVX2 + FMA kernels (checked once), for
/// the attention of [`super::kv::attend_segments`].
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    avx2()
}

/// Which dot-product kernels this process runs: ours (`"avx512-vnni"` or
/// `"avx2"`), or candle's `vec_dot` (`"candle"`) elsewhere. Benches and run
/// fingerprints carry it: one binary picks different kernels on different
/// CPUs, and their speeds differ.
pub fn kernel_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            return "avx512-vnni";
        }
        if avx2() {
            return "avx2";
        }
    }
    "candle"
}

fn blocks<T>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(bytes.len() % size, 0);
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: the GGML block types are `repr(C)` plain data (f16 / integer
    // fields, every bit pattern valid); the byte slices come from candle's
    // own storage of that type or from our scratch, which is aligned for
    // u64 and written with this type's `from_float`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

fn blocks_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(bytes.len() % size, 0);
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: as in `blocks`.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / size) }
}

fn act_row_bytes<T: GgmlType>(k: usize) -> usize {
    k / T::BLCK_SIZE * std::mem::size_of::<T>()
}

fn quantize_row<T: GgmlType>(x: &[f32], dst: &mut [u8]) {
    T::from_float(x, blocks_mut::<T>(dst))
}

fn dequantize_row<T: GgmlType>(src: &[u8], dst: &mut [f32]) {
    T::to_float(blocks::<T>(src), dst)
}

/// # Safety
/// Concurrent calls must have disjoint `cols`; `out` must hold
/// `(m - 1) * out_stride + n_out` floats.
unsafe fn dot_cols<T: Dot>(
    w: &[u8],
    k: usize,
    cols: Range<usize>,
    xq: &[u8],
    m: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let w: &[T] = blocks(w);
    let x: &[T::VecDotType] = blocks(xq);
    let kb = k / T::BLCK_SIZE;
    // Tiles of 16 weight rows by up to 8 activation rows, both about 15 KB
    // for the 1.5B's K-quants: each weight tile stays in L1 while every
    // activation tile passes over it, so activations come from L2 once per
    // 16 weight rows instead of once per weight row.
    const TILE_COLS: usize = 16;
    let mut buf = [0f32; 8];
    let mut c0 = cols.start;
    while c0 < cols.end {
        let tile = c0..(c0 + TILE_COLS).min(cols.end);
        let mut r0 = 0;
        while r0 < m {
            let xr = &x[r0 * kb..];
            // Eight rows per weight unpacking, then four, two, one: each
            // row's result is the same bits in any of them.
            let take = match m - r0 {
                8.. => 8,
                4..8 => 4,
                2..4 => 2,
                _ => 1,
            };
            for c in tile.clone() {
                let wr = &w[c * kb..(c + 1) * kb];
                match take {
                    8 => rows::<T, 8>(k, wr, xr, &mut buf),
                    4 => rows::<T, 4>(k, wr, xr, &mut buf),
                    2 => rows::<T, 2>(k, wr, xr, &mut buf),
                    _ => rows::<T, 1>(k, wr, xr, &mut buf),
                }
                for (i, &v) in buf[..take].iter().enumerate() {
                    // SAFETY: in bounds by the caller's contract; only this
                    // call writes column `c`.
                    unsafe { *out.add((r0 + i) * out_stride + c) = v };
                }
            }
            r0 += take;
        }
        c0 = tile.end;
    }
}

/// The first `N` activation rows of `x` (rows of `w.len()` blocks) against
/// the weight row `w`, into `out[..N]`.
#[inline]
fn rows<T: Dot, const N: usize>(k: usize, w: &[T], x: &[T::VecDotType], out: &mut [f32; 8]) {
    let kb = w.len();
    let v = T::dot_rows::<N>(k, w, std::array::from_fn(|i| &x[i * kb..(i + 1) * kb]));
    out[..N].copy_from_slice(&v);
}

fn kernel<T: Dot>() -> Kernel {
    Kernel {
        act: T::VecDotType::DTYPE,
        act_row_bytes: act_row_bytes::<T::VecDotType>,
        quantize_row: quantize_row::<T::VecDotType>,
        dot_cols: dot_cols::<T>,
        dequantize_row: dequantize_row::<T>,
        block_bytes: std::mem::size_of::<T>(),
        block_len: T::BLCK_SIZE,
    }
}

fn kernel_for(dtype: GgmlDType) -> Option<Kernel> {
    Some(match dtype {
        GgmlDType::F32 => kernel::<f32>(),
        GgmlDType::Q4_0 => kernel::<BlockQ4_0>(),
        GgmlDType::Q4_1 => kernel::<BlockQ4_1>(),
        GgmlDType::Q5_0 => kernel::<BlockQ5_0>(),
        GgmlDType::Q5_1 => kernel::<BlockQ5_1>(),
        GgmlDType::Q8_0 => kernel::<BlockQ8_0>(),
        GgmlDType::Q2K => kernel::<BlockQ2K>(),
        GgmlDType::Q3K => kernel::<BlockQ3K>(),
        GgmlDType::Q4K => kernel::<BlockQ4K>(),
        GgmlDType::Q5K => kernel::<BlockQ5K>(),
        GgmlDType::Q6K => kernel::<BlockQ6K>(),
        _ => return None,
    })
}

impl QWeight {
    /// Wraps a CPU `QTensor` of shape `[n_out, k_in]` for [`matmul`].
    pub fn new(name: &str, tensor: QTensor) -> Result<QWeight, DecoderError> {
        #[allow(unused_mut)]
        let mut w = QWeight::lookup(name, tensor)?;
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            w.packed = packed::pack(w.dtype(), w.bytes(), w.n_out, w.k_in);
        }
        Ok(w)
    }

    /// Wraps a CPU `QTensor` of shape `[n_out, k_in]` whose rows are only
    /// looked up ([`QWeight::dequantize_row`], an embedding table): no
    /// repacked copy. [`matmul`] still works on it, with the row kernels.
    pub fn lookup(name: &str, tensor: QTensor) -> Result<QWeight, DecoderError> {
        let dtype = tensor.dtype();
        let unsupported = |problem: String| DecoderError::Unsupported {
            what: format!("tensor {name}"),
            problem,
        };
        let kernel = kernel_for(dtype)
            .ok_or_else(|| unsupported(format!("block format {dtype:?} has no kernel here")))?;
        let (n_out, k_in) = tensor
            .shape()
            .dims2()
            .map_err(|e| unsupported(format!("not a matrix: {e}")))?;
        if !k_in.is_multiple_of(kernel.block_len) {
            return Err(unsupported(format!(
                "row length {k_in} is not a multiple of the block length {}",
                kernel.block_len
            )));
        }
        if !matches!(tensor.data(), Ok(std::borrow::Cow::Borrowed(_))) {
            return Err(unsupported("not in CPU memory".into()));
        }
        Ok(QWeight {
            tensor,
            n_out,
            k_in,
            kernel,
            #[cfg(target_arch = "x86_64")]
            packed: None,
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.tensor.dtype()
    }

    pub fn tensor(&self) -> &QTensor {
        &self.tensor
    }

    fn bytes(&self) -> &[u8] {
        match self.tensor.data() {
            Ok(std::borrow::Cow::Borrowed(b)) => b,
            // `new` only accepts CPU tensors, whose data is always borrowed.
            _ => unreachable!("QWeight holds a CPU tensor"),
        }
    }

    fn row_bytes(&self) -> usize {
        self.k_in / self.kernel.block_len * self.kernel.block_bytes
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let rb = self.row_bytes();
        (self.kernel.dequantize_row)(&self.bytes()[r * rb..(r + 1) * rb], dst)
    }
}

/// Quantized activation rows, one buffer per activation format, reused
/// across calls (no allocation in the decode loop once warm). Rows are
/// quantized on the calling thread: quantizing a prompt's rows on both
/// threads was tried (commit 24a96d9) and changed nothing measurable
/// (Qwen 0.5B prompt processing, 512 tokens: 131 against 132 tokens/s).
#[derive(Default)]
pub struct Scratch {
    bufs: Vec<(GgmlDType, usize, Vec<u64>)>,
    /// Per Q8_0 buffer (same index), each row's per-block side values for
    /// the packed kernels.
    #[cfg(target_arch = "x86_64")]
    sides: Vec<Vec<packed::Q8_0Side>>,
}

impl Scratch {
    fn prepare(&mut self, kernel: &Kernel, x: &[f32], m: usize, k: usize) -> usize {
        let row = (kernel.act_row_bytes)(k);
        let idx = match self
            .bufs
            .iter()
            .position(|(d, kk, _)| *d == kernel.act && *kk == k)
        {
            Some(i) => i,
            None => {
                self.bufs.push((kernel.act, k, Vec::new()));
                #[cfg(target_arch = "x86_64")]
                self.sides.push(Vec::new());
                self.bufs.len() - 1
            }
        };
        let buf = &mut self.bufs[idx].2;
        let words = (m * row).div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0);
        }
        // SAFETY: u64 storage viewed as bytes, within its length.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, m * row) };
        for r in 0..m {
            (kernel.quantize_row)(&x[r * k..(r + 1) * k], &mut bytes[r * row..(r + 1) * row]);
        }
        #[cfg(target_arch = "x86_64")]
        if kernel.act == GgmlDType::Q8_0 && avx512() {
            let side = &mut self.sides[idx];
            side.clear();
            side.extend(blocks::<BlockQ8_0>(bytes).iter().map(packed::Q8_0Side::of));
        }
        idx
    }

    fn bytes(&self, idx: usize, len: usize) -> &[u8] {
        let buf = &self.bufs[idx].2;
        // SAFETY: as in `prepare`; `len` bytes were written there.
        unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, len) }
    }
}

/// One product of a fused call: `out[m, w.n_out] = x[m, k] w^T`.
pub struct Product<'a> {
    pub w: &'a QWeight,
    pub out: &'a mut [f32],
}

/// Computes several products that share the input `x` (`m` rows of `k`) in
/// one parallel region (q/k/v, or gate/up): one barrier instead of three.
/// Columns of all products are split across candle's persistent thread pool.
pub fn matmul(x: &[f32], m: usize, k: usize, products: &mut [Product<'_>], scratch: &mut Scratch) {
    assert_eq!(x.len(), m * k, "matmul input");
    struct Job<'a> {
        w_bytes: usize,
        w_len: usize,
        k: usize,
        n: usize,
        xq_idx: usize,
        xq_len: usize,
        #[cfg(target_arch = "x86_64")]
        xq_row: usize,
        out: usize,
        dot: DotCols,
        first_col: usize,
        #[cfg(target_arch = "x86_64")]
        packed: Option<&'a packed::Packed>,
    }
    let mut jobs: Vec<Job> = Vec::with_capacity(products.len());
    let mut prepared: Vec<(GgmlDType, usize)> = Vec::with_capacity(products.len());
    let mut total_cols = 0;
    for p in products.iter_mut() {
        assert_eq!(p.w.k_in, k, "matmul inner dimension");
        assert!(p.out.len() >= m * p.w.n_out, "matmul output too small");
        // Products sharing an activation format share its quantized rows.
        let xq_idx = match prepared.iter().find(|(d, _)| *d == p.w.kernel.act) {
            Some(&(_, i)) => i,
            None => {
                let i = scratch.prepare(&p.w.kernel, x, m, k);
                prepared.push((p.w.kernel.act, i));
                i
            }
        };
        let bytes = p.w.bytes();
        jobs.push(Job {
            w_bytes: bytes.as_ptr() as usize,
            w_len: bytes.len(),
            k,
            n: p.w.n_out,
            xq_idx,
            xq_len: m * (p.w.kernel.act_row_bytes)(k),
            #[cfg(target_arch = "x86_64")]
            xq_row: (p.w.kernel.act_row_bytes)(k),
            out: p.out.as_mut_ptr() as usize,
            dot: p.w.kernel.dot_cols,
            first_col: total_cols,
            #[cfg(target_arch = "x86_64")]
            packed: p.w.packed.as_ref(),
        });
        total_cols += p.w.n_out;
    }
    let scratch = &*scratch;
    // Work items are groups of columns, small enough to balance two threads
    // and large enough to amortise the shared cursor.
    const GROUP: usize = 16;
    let groups = total_cols.div_ceil(GROUP);
    let jobs = &jobs;
    let run = |range: Range<usize>| {
        let (lo, hi) = (range.start * GROUP, (range.end * GROUP).min(total_cols));
        for job in jobs.iter() {
            let (a, b) = (lo.max(job.first_col), hi.min(job.first_col + job.n));
            if a >= b {
                continue;
            }
            #[allow(unused_mut)]
            let mut a = a;
            // Columns in whole groups of sixteen go to the packed kernels
            // where the weight has them; which kernel computes a column
            // depends only on the column, never on `m`.
            #[cfg(target_arch = "x86_64")]
            if let Some(p) = job.packed {
                let pb = b.min(job.first_col + p.rows);
                if a < pb {
                    let act = packed::Act {
                        xq: scratch.bytes(job.xq_idx, job.xq_len),
                        row_bytes: job.xq_row,
                        side: &scratch.sides[job.xq_idx],
                    };
                    // SAFETY: as below; the packed rows are the weight's
                    // first `p.rows`, and `avx512()` held when they were
                    // packed (and holds for the process).
                    unsafe {
                        (p.cols)(
                            &p.data,
                            job.k,
                            a - job.first_col..pb - job.first_col,
                            act,
                            m,
                            job.out as *mut f32,
                            job.n,
                        )
                    };
                    a = pb;
                }
                if a >= b {
                    continue;
                }
            }
            // SAFETY: the weight bytes outlive this call (borrowed from
            // `products`); each column range goes to exactly one worker, and
            // `out` holds m rows of n (asserted above).
            unsafe {
                let w = std::slice::from_raw_parts(job.w_bytes as *const u8, job.w_len);
                (job.dot)(
                    w,
                    job.k,
                    a - job.first_col..b - job.first_col,
                    scratch.bytes(job.xq_idx, job.xq_len),
                    m,
                    job.out as *mut f32,
                    job.n,
                );
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(groups, run);
}

/// `out = x / sqrt(mean(x^2) + eps) * w`, one row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f32 = x.iter().map(|v| v * v).sum();
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)`: GGUF llama (the converter permutes q/k rows).
    Interleaved,
    /// Pairs `(i, i + d/2)`: GPT-NeoX, Qwen2.
    Neox,
}

/// [`rope_table`] for a block of positions: rows `i` of `cos` and `sin`
/// (`rope_dim / 2` values each) for position `base + depth[i]`.
pub fn rope_tables(
    base: usize,
    depth: &[usize],
    rope_dim: usize,
    theta_base: f32,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let half = rope_dim / 2;
    for (i, &d) in depth.iter().enumerate() {
        rope_table(
            base + d,
            rope_dim,
            theta_base,
            &mut cos[i * half..(i + 1) * half],
            &mut sin[i * half..(i + 1) * half],
        );
    }
}

/// `cos`/`sin` of `pos * theta_i` for the `rope_dim / 2` frequencies
/// `theta_i = base^(-2i / rope_dim)`, computed the way candle-transformers
/// does (f32 throughout), so both implementations rotate identically.
pub fn rope_table(pos: usize, rope_dim: usize, base: f32, cos: &mut [f32], sin: &mut [f32]) {
    for i in 0..rope_dim / 2 {
        let theta = 1.0 / base.powf((2 * i) as f32 / rope_dim as f32);
        let a = pos as f32 * theta;
        cos[i] = a.cos();
        sin[i] = a.sin();
    }
}

/// Rotates every head of `x` (`n_heads * head_dim`) in place.
pub fn rope(x: &mut [f32], head_dim: usize, style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + head_dim / 2),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// `gate = silu(gate) * up`, in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// A dot product whose summation order depends only on the length (eight
/// partial sums, then a fixed tree): the same bits wherever it is called.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 dot products of one weight row with `NR` activation rows. Each
    //! block's integer dot product is exact; per row, the f32 accumulation
    //! order is fixed (8-lane accumulators, one fused multiply-add per
    //! block, then a fixed horizontal sum) and does not depend on `NR`:
    //! only the weight unpacking is shared between rows. Q4_K and Q6_K
    //! follow ggml's AVX2 kernels (as candle's do), except that Q6_K's
    //! offset of 32 is taken out once per sub-block through the activation
    //! block sums instead of once per byte.
    use candle_core::quantized::k_quants::{
        BlockQ4K, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1,
    };
    use std::arch::x86_64::*;

    // Mirrors of candle's block layouts (its fields are crate-private).
    #[repr(C)]
    pub struct Q4_1 {
        pub(in crate::decoder::kernels) d: u16,
        pub(in crate::decoder::kernels) m: u16,
        pub(in crate::decoder::kernels) qs: [u8; 16],
    }
    #[repr(C)]
    pub struct Q8_1 {
        pub(in crate::decoder::kernels) d: u16,
        pub(in crate::decoder::kernels) s: u16,
        pub(in crate::decoder::kernels) qs: [i8; 32],
    }
    #[repr(C)]
    pub struct Q5_0 {
        pub(in crate::decoder::kernels) d: u16,
        pub(in crate::decoder::kernels) qh: [u8; 4],
        pub(in crate::decoder::kernels) qs: [u8; 16],
    }
    #[repr(C)]
    pub struct Q8_0 {
        pub(in crate::decoder::kernels) d: u16,
        pub(in crate::decoder::kernels) qs: [i8; 32],
    }
    #[repr(C)]
    pub struct Q4K {
        pub(in crate::decoder::kernels) d: u16,
        pub(in crate::decoder::kernels) dmin: u16,
        pub(in crate::decoder::kernels) scales: [u8; 12],
        pub(in crate::decoder::kernels) qs: [u8; 128],
    }
    #[repr(C)]
    pub struct Q6K {
        pub(in crate::decoder::kernels) ql: [u8; 128],
        pub(in crate::decoder::kernels) qh: [u8; 64],
        pub(in crate::decoder::kernels) scales: [i8; 16],
        pub(in crate::decoder::kernels) d: u16,
    }
    #[repr(C)]
    pub struct Q8K {
        pub(in crate::decoder::kernels) d: f32,
        pub(in crate::decoder::kernels) qs: [i8; 256],
        pub(in crate::decoder::kernels) bsums: [i16; 16],
    }

    /// A candle block type and its mirror here.
    ///
    /// # Safety
    /// `Self` must have the layout of `Of`: same size, alignment no
    /// stricter, fields of the same types in the same `repr(C)` order.
    pub(super) unsafe trait Mirror {
        type Of;
    }
    macro_rules! mirror {
        ($($ours:ty => $theirs:ty),*) => {$(
            const _: () = assert!(std::mem::size_of::<$ours>() == std::mem::size_of::<$theirs>());
            const _: () = assert!(std::mem::align_of::<$ours>() <= std::mem::align_of::<$theirs>());
            // SAFETY: same size (asserted), alignment no stricter, and the
            // fields in candle's `repr(C)` order.
            unsafe impl Mirror for $ours {
                type Of = $theirs;
            }
        )*};
    }
    mirror!(Q4_1 => BlockQ4_1, Q8_1 => BlockQ8_1, Q5_0 => BlockQ5_0, Q8_0 => BlockQ8_0,
            Q4K => BlockQ4K, Q6K => BlockQ6K, Q8K => BlockQ8K);

    pub(super) fn view<M: Mirror>(s: &[M::Of]) -> &[M] {
        // SAFETY: `Mirror` guarantees the same layout.
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const M, s.len()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(x: __m256) -> f32 {
        hsum128(_mm_add_ps(
            _mm256_extractf128_ps::<1>(x),
            _mm256_castps256_ps128(x),
        ))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum128(r: __m128) -> f32 {
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const i8) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    /// 32 nibbles: low nibbles of the 16 bytes first, then the high ones.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let b = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4));
        _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
    }

    /// 0xFF in byte j where bit j of `qh` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn bits_to_bytes(qh: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// Sum of u8 x i8 products, as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn madd_us(ux: __m256i, sy: __m256i) -> __m256 {
        let p = _mm256_maddubs_epi16(ux, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    /// The 32-byte blocks formats (Q5_0, Q8_0 against Q8_0): signed weights
    /// `qx` (shared by the rows) against each row's block, through the sign
    /// trick (|qx| times qy with qx's sign).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn signed_rows<const NR: usize>(
        acc: &mut [__m256; NR],
        qx: __m256i,
        wd: f32,
        rows: [&Q8_0; NR],
    ) {
        let ax = _mm256_sign_epi8(qx, qx);
        for r in 0..NR {
            let y = rows[r];
            let qy = unsafe { load(y.qs.as_ptr()) };
            let d = _mm256_set1_ps(wd * f16(y.d));
            acc[r] = _mm256_fmadd_ps(d, madd_us(ax, _mm256_sign_epi8(qy, qx)), acc[r]);
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; every `x[r]` has `w.len()`
    /// blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_q8_1<const NR: usize>(
        w: &[BlockQ4_1],
        x: [&[BlockQ8_1]; NR],
    ) -> [f32; NR] {
        let (w, x) = (view::<Q4_1>(w), x.map(view::<Q8_1>));
        let mut acc = [_mm256_setzero_ps(); NR];
        let mut mins = [0f32; NR];
        for (i, wb) in w.iter().enumerate() {
            let (wd, wm) = (f16(wb.d), f16(wb.m));
            let qx = unsafe { nibbles(wb.qs.as_ptr()) };
            for r in 0..NR {
                let y = &x[r][i];
                mins[r] += wm * f16(y.s);
                let qy = unsafe { load(y.qs.as_ptr()) };
                let d = _mm256_set1_ps(wd * f16(y.d));
                acc[r] = _mm256_fmadd_ps(d, madd_us(qx, qy), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + mins[r])
    }

    /// A Q5_0 block's 32 weights as signed bytes, q - 16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q5_0_signed(wb: &Q5_0) -> __m256i {
        // SAFETY: 16 bytes of the block.
        let lo = unsafe { nibbles(wb.qs.as_ptr()) };
        // Where the fifth bit is clear, set the top four.
        let hi = _mm256_andnot_si256(
            bits_to_bytes(u32::from_le_bytes(wb.qh)),
            _mm256_set1_epi8(0xF0u8 as i8),
        );
        _mm256_or_si256(lo, hi)
    }

    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q5_0_q8_0<const NR: usize>(
        w: &[BlockQ5_0],
        x: [&[BlockQ8_0]; NR],
    ) -> [f32; NR] {
        let (w, x) = (view::<Q5_0>(w), x.map(view::<Q8_0>));
        let mut acc = [_mm256_setzero_ps(); NR];
        for (i, wb) in w.iter().enumerate() {
            let qx = q5_0_signed(wb);
            unsafe { signed_rows(&mut acc, qx, f16(wb.d), x.map(|x| &x[i])) };
        }
        acc.map(|a| hsum(a))
    }

    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0_q8_0<const NR: usize>(
        w: &[BlockQ8_0],
        x: [&[BlockQ8_0]; NR],
    ) -> [f32; NR] {
        let (w, x) = (view::<Q8_0>(w), x.map(view::<Q8_0>));
        let mut acc = [_mm256_setzero_ps(); NR];
        for (i, wb) in w.iter().enumerate() {
            let qx = unsafe { load(wb.qs.as_ptr()) };
            unsafe { signed_rows(&mut acc, qx, f16(wb.d), x.map(|x| &x[i])) };
        }
        acc.map(|a| hsum(a))
    }

    /// Q4_K's eight 6-bit scales (lanes 0-7) and eight 6-bit mins (lanes
    /// 8-15) as i16, from its 12 packed bytes: ggml's packing, the low six
    /// bits of bytes 0-7, the rest spread over their top bits and bytes
    /// 8-11; unpacked four at a time in u32 words, as ggml does.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4k_scales_mins(packed: &[u8; 12]) -> __m256i {
        const LOW6: u32 = 0x3f3f3f3f;
        const LOW4: u32 = 0x0f0f0f0f;
        const LOW2: u32 = 0x03030303;
        let word = |i: usize| {
            u32::from_le_bytes([
                packed[4 * i],
                packed[4 * i + 1],
                packed[4 * i + 2],
                packed[4 * i + 3],
            ])
        };
        let (a, b, c) = (word(0), word(1), word(2));
        let scales_lo = a & LOW6;
        let scales_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
        let mins_lo = b & LOW6;
        let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
        _mm256_cvtepu8_epi16(_mm_set_epi32(
            mins_hi as i32,
            mins_lo as i32,
            scales_hi as i32,
            scales_lo as i32,
        ))
    }

    /// Each of 8 i16 lanes twice: `[a0, a0, a1, a1, ..., a7, a7]`, the
    /// weight of each 16-element block sum of a 32-element sub-block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pairs16(a: __m128i) -> __m256i {
        let t = _mm256_cvtepu16_epi32(a);
        _mm256_or_si256(t, _mm256_slli_epi32::<16>(t))
    }

    /// Broadcasts i16 lane `i` of each 128-bit half.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lane16(v: __m256i, i: usize) -> __m256i {
        let b = (2 * i as i64) | ((2 * i as i64 + 1) << 8);
        let pair = b | (b << 16) | (b << 32) | (b << 48);
        _mm256_shuffle_epi8(v, _mm256_set1_epi64x(pair))
    }

    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k_q8k<const NR: usize>(w: &[BlockQ4K], x: [&[BlockQ8K]; NR]) -> [f32; NR] {
        let (w, x) = (view::<Q4K>(w), x.map(view::<Q8K>));
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); NR];
        let mut acc_m = [_mm256_setzero_ps(); NR];
        for (i, wb) in w.iter().enumerate() {
            let (wd, wmin) = (f16(wb.d), f16(wb.dmin));
            let sm = q4k_scales_mins(&wb.scales);
            let scales = _mm256_permute2x128_si256::<0x00>(sm, sm);
            // Minimums: sum over sub-blocks of min * (sum of its 32
            // activations), from the 16-element block sums.
            let mins = pairs16(_mm256_extracti128_si256::<1>(sm));
            for r in 0..NR {
                let y = &x[r][i];
                let bs = unsafe { load(y.bsums.as_ptr() as *const i8) };
                let prod = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs));
                acc_m[r] = _mm256_fmadd_ps(_mm256_set1_ps(-y.d * wmin), prod, acc_m[r]);
            }
            let mut sumi = [_mm256_setzero_si256(); NR];
            for j in 0..4 {
                let scale_l = lane16(scales, 2 * j);
                let scale_h = lane16(scales, 2 * j + 1);
                let bits = unsafe { load(wb.qs.as_ptr().add(32 * j) as *const i8) };
                let q4l = _mm256_and_si256(bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                for r in 0..NR {
                    let q8 = x[r][i].qs.as_ptr();
                    let (q8l, q8h) = unsafe { (load(q8.add(64 * j)), load(q8.add(64 * j + 32))) };
                    let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                    let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
                }
            }
            for r in 0..NR {
                let d = _mm256_set1_ps(x[r][i].d * wd);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + hsum(acc_m[r]))
    }

    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k_q8k<const NR: usize>(w: &[BlockQ6K], x: [&[BlockQ8K]; NR]) -> [f32; NR] {
        let (w, x) = (view::<Q6K>(w), x.map(view::<Q8K>));
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); NR];
        for (i, wb) in w.iter().enumerate() {
            let wd = f16(wb.d);
            let scales = unsafe { _mm_loadu_si128(wb.scales.as_ptr() as *const __m128i) };
            // Weights are q - 32 with q in 0..64: sum sc q y directly, and
            // take 32 sc (sum of y) per 16-element sub-block off up front.
            let mut sumi = [_mm256_setzero_si256(); NR];
            let sc16 = _mm256_cvtepi8_epi16(scales);
            for r in 0..NR {
                let bs = unsafe { load(x[r][i].bsums.as_ptr() as *const i8) };
                let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
                sumi[r] = _mm256_sub_epi32(sumi[r], off);
            }
            for half in 0..2 {
                let ql = wb.ql.as_ptr().wrapping_add(64 * half);
                let (b1, b2, bh) = unsafe {
                    (
                        load(ql as *const i8),
                        load(ql.add(32) as *const i8),
                        load(wb.qh.as_ptr().add(32 * half) as *const i8),
                    )
                };
                let high = |shift: i32| {
                    let h = match shift {
                        0 => bh,
                        2 => _mm256_srli_epi16(bh, 2),
                        4 => _mm256_srli_epi16(bh, 4),
                        _ => _mm256_srli_epi16(bh, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(h, m2), 4)
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(b1, m4), high(0)),
                    _mm256_or_si256(_mm256_and_si256(b2, m4), high(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), high(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), high(6)),
                ];
                for (t, &qt) in q.iter().enumerate() {
                    // 32 weights, sub-blocks 2g and 2g + 1.
                    let g = 4 * half + t;
                    let pick = _mm_set_epi64x(
                        (2 * g as i64 + 1) * 0x0101010101010101,
                        2 * g as i64 * 0x0101010101010101,
                    );
                    let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                    for r in 0..NR {
                        let y = unsafe { load(x[r][i].qs.as_ptr().add(32 * g)) };
                        let p = _mm256_madd_epi16(s, _mm256_maddubs_epi16(qt, y));
                        sumi[r] = _mm256_add_epi32(sumi[r], p);
                    }
                }
            }
            for r in 0..NR {
                let d = _mm256_set1_ps(x[r][i].d * wd);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        acc.map(|a| hsum(a))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn hsum512(x: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        hsum(_mm256_add_ps(_mm512_castps512_ps256(x), hi))
    }

    /// i16 lane `idx[l / 8]` of `v` in lanes `l` = 0..32 (groups of eight:
    /// one 16-element sub-block of maddubs output per group).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn spread16(v: __m512i, idx: [usize; 4]) -> __m512i {
        let lanes: [i16; 32] = std::array::from_fn(|l| idx[l / 8] as i16);
        // SAFETY: 64 bytes read from a 64-byte array.
        let lanes = unsafe { _mm512_loadu_si512(lanes.as_ptr() as *const __m512i) };
        _mm512_permutexvar_epi16(lanes, v)
    }

    /// Q4_K with 512-bit vectors: one maddubs and one fused
    /// multiply-accumulate (VNNI `vpdpwssd`) per 64 weights per row, where
    /// AVX2 needs two of each and two adds.
    ///
    /// # Safety
    /// As for [`dot_q4_1_q8_1`], and AVX512F/BW/VL/VNNI must be available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q4k_q8k_512<const NR: usize>(
        w: &[BlockQ4K],
        x: [&[BlockQ8K]; NR],
    ) -> [f32; NR] {
        let (w, x) = (view::<Q4K>(w), x.map(view::<Q8K>));
        let m4 = _mm512_set1_epi8(0x0F);
        // Low 32 bytes: low nibbles (sub-block 2j); high: high (2j + 1).
        let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        let mut acc = [_mm512_setzero_ps(); NR];
        for (i, wb) in w.iter().enumerate() {
            let (wd, wmin) = (f16(wb.d), f16(wb.dmin));
            let sm = q4k_scales_mins(&wb.scales);
            let mins = pairs16(_mm256_extracti128_si256::<1>(sm));
            for r in 0..NR {
                let y = &x[r][i];
                let bs = unsafe { load(y.bsums.as_ptr() as *const i8) };
                let prod = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs));
                // Into the same accumulator (lanes 0-7): fewer registers
                // live across the loop below.
                let prod = _mm512_zextps256_ps512(prod);
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(-y.d * wmin), prod, acc[r]);
            }
            let sm = _mm512_zextsi256_si512(sm);
            let mut sumi = [_mm512_setzero_si512(); NR];
            for j in 0..4 {
                let bits = unsafe { load(wb.qs.as_ptr().add(32 * j) as *const i8) };
                let q4 =
                    _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(bits), shift), m4);
                let s = spread16(sm, [2 * j, 2 * j, 2 * j + 1, 2 * j + 1]);
                for r in 0..NR {
                    // SAFETY: 64 of the block's 256 activations.
                    let y = unsafe {
                        _mm512_loadu_si512(x[r][i].qs.as_ptr().add(64 * j) as *const __m512i)
                    };
                    sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(q4, y), s);
                }
            }
            for r in 0..NR {
                let d = _mm512_set1_ps(x[r][i].d * wd);
                acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        acc.map(|a| hsum512(a))
    }

    /// Q6_K with 512-bit vectors (see [`dot_q4k_q8k_512`]).
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k_512`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q6k_q8k_512<const NR: usize>(
        w: &[BlockQ6K],
        x: [&[BlockQ8K]; NR],
    ) -> [f32; NR] {
        let (w, x) = (view::<Q6K>(w), x.map(view::<Q8K>));
        let m4 = _mm512_set1_epi8(0x0F);
        let m2 = _mm512_set1_epi8(3);
        // High bits: bits 0-1 (and 4-5) of qh for the low 32 weights of a
        // vector, bits 2-3 (and 6-7) for the high 32.
        let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
        let mut acc = [_mm512_setzero_ps(); NR];
        for (i, wb) in w.iter().enumerate() {
            let wd = f16(wb.d);
            let scales = unsafe { _mm_loadu_si128(wb.scales.as_ptr() as *const __m128i) };
            let sc16 = _mm256_cvtepi8_epi16(scales);
            let mut sumi = [_mm512_setzero_si512(); NR];
            for r in 0..NR {
                let bs = unsafe { load(x[r][i].bsums.as_ptr() as *const i8) };
                let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
                sumi[r] = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), off));
            }
            let sc16 = _mm512_zextsi256_si512(sc16);
            for half in 0..2 {
                // SAFETY: 64 of the 128 low-bit bytes, 32 of the 64 high.
                let (b, h) = unsafe {
                    (
                        _mm512_loadu_si512(wb.ql.as_ptr().add(64 * half) as *const __m512i),
                        load(wb.qh.as_ptr().add(32 * half) as *const i8),
                    )
                };
                let h = _mm512_srlv_epi16(_mm512_broadcast_i64x4(h), shift);
                let q = [
                    _mm512_or_si512(
                        _mm512_and_si512(b, m4),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(h, m2)),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(b), m4),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(h), m2)),
                    ),
                ];
                for (t, &qt) in q.iter().enumerate() {
                    // 64 weights, sub-blocks p..p + 4.
                    let p = 8 * half + 4 * t;
                    let s = spread16(sc16, [p, p + 1, p + 2, p + 3]);
                    for r in 0..NR {
                        // SAFETY: 64 of the block's 256 activations.
                        let y = unsafe {
                            _mm512_loadu_si512(
                                x[r][i].qs.as_ptr().add(64 * (2 * half + t)) as *const __m512i
                            )
                        };
                        sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(qt, y), s);
                    }
                }
            }
            for r in 0..NR {
                let d = _mm512_set1_ps(x[r][i].d * wd);
                acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        acc.map(|a| hsum512(a))
    }

    /// A 32-weight-block kernel (signed weights against Q8_0 rows) over
    /// pairs of blocks `i`, `i + 1` (block `i` and zero weights at an odd
    /// end) in 512-bit vectors: per row, one VNNI dot product per 64
    /// weights and one fused multiply-add with the two blocks' scales.
    /// `$signed` gives a block's weights as signed bytes. A macro rather
    /// than a function taking closures, which the compiler left un-inlined.
    macro_rules! pairs_512 {
        ($name:ident, $block:ty, $mirror:ty, $signed:expr) => {
            /// # Safety
            /// As for [`dot_q4k_q8k_512`].
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
            pub unsafe fn $name<const NR: usize>(w: &[$block], x: [&[BlockQ8_0]; NR]) -> [f32; NR] {
                let (w, x) = (view::<$mirror>(w), x.map(view::<Q8_0>));
                let mut acc = [_mm512_setzero_ps(); NR];
                let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
                let n = w.len();
                let mut i = 0;
                while i < n {
                    let j = (i + 1).min(n - 1);
                    let lo: __m256i = $signed(&w[i]);
                    let hi: __m256i = if j > i {
                        $signed(&w[j])
                    } else {
                        _mm256_setzero_si256()
                    };
                    let qx = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    let wd = _mm_set_ps(0.0, 0.0, f16(w[j].d), f16(w[i].d));
                    // |w| times y with w's sign, as in `signed_rows`.
                    let ax = _mm512_abs_epi8(qx);
                    let neg = _mm512_movepi8_mask(qx);
                    for r in 0..NR {
                        let (ya, yb) = (&x[r][i], &x[r][j]);
                        // SAFETY: 32 bytes of each block.
                        let y = unsafe {
                            _mm512_inserti64x4::<1>(
                                _mm512_castsi256_si512(load(ya.qs.as_ptr())),
                                load(yb.qs.as_ptr()),
                            )
                        };
                        let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
                        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy);
                        let yd = _mm_cvtph_ps(_mm_insert_epi16::<1>(
                            _mm_cvtsi32_si128(ya.d as i32),
                            yb.d as i32,
                        ));
                        let d = _mm512_permutexvar_ps(
                            halves,
                            _mm512_castps128_ps512(_mm_mul_ps(wd, yd)),
                        );
                        acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(dot), acc[r]);
                    }
                    i += 2;
                }
                let mut out = [0f32; NR];
                for r in 0..NR {
                    out[r] = hsum512(acc[r]);
                }
                out
            }
        };
    }

    /// 32 bytes of a Q8_0 block's weights.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q8_0_signed(wb: &Q8_0) -> __m256i {
        // SAFETY: the block's 32 bytes.
        unsafe { load(wb.qs.as_ptr()) }
    }

    pairs_512!(dot_q5_0_q8_0_512, BlockQ5_0, Q5_0, q5_0_signed);
    pairs_512!(dot_q8_0_q8_0_512, BlockQ8_0, Q8_0, q8_0_signed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::BlockQ8K;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Our dot products (one row, and 8, 4 and 2 rows at once) against
    /// candle's scalar reference `vec_dot_unopt` on random blocks. Both sum
    /// exact per-block integer products; only the f32 accumulation order
    /// differs, so the difference is a few ulps of the sum of absolute block
    /// terms: 1e-5 per block relative to the result. 36 weight rows: two
    /// groups of sixteen for the packed kernels, four for the row kernels.
    fn matches_candle_scalar<T: GgmlType>(dtype: GgmlDType, seed: u64) {
        let (n, k, m) = (36, 1024, 8 + 4 + 2 + 1);
        let w = Tensor::from_vec(random(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let qw = QWeight::new("w", QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let x = random(m * k, seed + 10);
        let mut out = vec![0f32; m * n];
        let mut s = Scratch::default();
        let mut products = [Product {
            w: &qw,
            out: &mut out,
        }];
        matmul(&x, m, k, &mut products, &mut s);
        let act = (qw.kernel.act_row_bytes)(k);
        let xq = s.bytes(0, m * act).to_vec();
        let rb = qw.row_bytes();
        for r in 0..m {
            let xr: &[T::VecDotType] = blocks(&xq[r * act..(r + 1) * act]);
            for c in 0..n {
                let wr: &[T] = blocks(&qw.bytes()[c * rb..(c + 1) * rb]);
                let want = T::vec_dot_unopt(k, wr, xr);
                let got = out[r * n + c];
                let tol = 1e-5 * xr.len() as f32 * (want.abs() + 1.0);
                assert!(
                    (got - want).abs() <= tol,
                    "{dtype:?} ({r},{c}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn own_dots_match_candle_scalar() {
        matches_candle_scalar::<BlockQ4_1>(GgmlDType::Q4_1, 1);
        matches_candle_scalar::<BlockQ5_0>(GgmlDType::Q5_0, 2);
        matches_candle_scalar::<BlockQ8_0>(GgmlDType::Q8_0, 3);
        matches_candle_scalar::<BlockQ4K>(GgmlDType::Q4K, 4);
        matches_candle_scalar::<BlockQ6K>(GgmlDType::Q6K, 5);
    }

    /// `x` in blocks of `T` (rows of whole blocks quantize the same laid
    /// end to end, since every block is quantized on its own).
    fn quantized<T: GgmlType>(x: &[f32]) -> Vec<T> {
        let mut b = vec![T::zeros(); x.len() / T::BLCK_SIZE];
        T::from_float(x, &mut b);
        b
    }

    /// Both x86 kernels of each format that has two (AVX2, and AVX-512
    /// where the CPU has it: a run uses one of them, so each is checked
    /// here directly) against candle's scalar reference, within the
    /// tolerance above.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_x86_kernels_match_candle_scalar() {
        let k = 1024;
        let x = random(3 * k, 21);
        let xq: Vec<BlockQ8K> = quantized(&x);
        let rows: [&[BlockQ8K]; 3] = std::array::from_fn(|r| &xq[r * 4..(r + 1) * 4]);
        let check = |name: &str, got: [f32; 3], want: [f32; 3]| {
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 4e-5 * (w.abs() + 1.0),
                    "{name}: {g} vs {w}"
                );
            }
        };
        let w = random(k, 22);
        let q4: Vec<BlockQ4K> = quantized(&w);
        let q6: Vec<BlockQ6K> = quantized(&w);
        let want4 = rows.map(|x| BlockQ4K::vec_dot_unopt(k, &q4, x));
        let want6 = rows.map(|x| BlockQ6K::vec_dot_unopt(k, &q6, x));
        if avx2() {
            // SAFETY: AVX2/FMA/F16C checked; whole blocks of equal count.
            check(
                "q4k avx2",
                unsafe { x86::dot_q4k_q8k::<3>(&q4, rows) },
                want4,
            );
            check(
                "q6k avx2",
                unsafe { x86::dot_q6k_q8k::<3>(&q6, rows) },
                want6,
            );
        }
        if avx512() {
            // SAFETY: as above, and the AVX-512 subsets checked.
            check(
                "q4k avx512",
                unsafe { x86::dot_q4k_q8k_512::<3>(&q4, rows) },
                want4,
            );
            check(
                "q6k avx512",
                unsafe { x86::dot_q6k_q8k_512::<3>(&q6, rows) },
                want6,
            );
        }

        // The 32-weight formats, on an odd number of blocks (the AVX-512
        // kernels take blocks in pairs).
        let k = 32 * 33;
        let x = random(3 * k, 23);
        let xq: Vec<BlockQ8_0> = quantized(&x);
        let rows: [&[BlockQ8_0]; 3] = std::array::from_fn(|r| &xq[r * 33..(r + 1) * 33]);
        let w = random(k, 24);
        let q5: Vec<BlockQ5_0> = quantized(&w);
        let q8: Vec<BlockQ8_0> = quantized(&w);
        let want5 = rows.map(|x| BlockQ5_0::vec_dot_unopt(k, &q5, x));
        let want8 = rows.map(|x| BlockQ8_0::vec_dot_unopt(k, &q8, x));
        if avx2() {
            // SAFETY: as above.
            check(
                "q5_0 avx2",
                unsafe { x86::dot_q5_0_q8_0::<3>(&q5, rows) },
                want5,
            );
            check(
                "q8_0 avx2",
                unsafe { x86::dot_q8_0_q8_0::<3>(&q8, rows) },
                want8,
            );
        }
        if avx512() {
            // SAFETY: as above.
            check(
                "q5_0 avx512",
                unsafe { x86::dot_q5_0_q8_0_512::<3>(&q5, rows) },
                want5,
            );
            check(
                "q8_0 avx512",
                unsafe { x86::dot_q8_0_q8_0_512::<3>(&q8, rows) },
                want8,
            );
        }
    }

    /// Rows computed alone and in a batch are bit-identical, for every
    /// format the models use.
    #[test]
    fn matmul_rows_are_batch_independent() {
        let (n, k, m) = (40, 512, 15);
        let x = random(m * k, 7);
        for dtype in [
            GgmlDType::F32,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let w = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
            let qw = QWeight::new("w", QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let mut s = Scratch::default();
            let mut all = vec![0f32; m * n];
            matmul(
                &x,
                m,
                k,
                &mut [Product {
                    w: &qw,
                    out: &mut all,
                }],
                &mut s,
            );
            for r in 0..m {
                let mut one = vec![0f32; n];
                matmul(
                    &x[r * k..(r + 1) * k],
                    1,
                    k,
                    &mut [Product {
                        w: &qw,
                        out: &mut one,
                    }],
                    &mut s,
                );
                assert_eq!(one, all[r * n..(r + 1) * n], "{dtype:?} row {r}");
            }
            // And the values are right: against the dequantized weight in f64,
            // within the activation quantization error (8-bit: about 1% of
            // |w||x| per element, far above any summation-order effect).
            let wd = qw
                .tensor()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for r in 0..m {
                for c in 0..n {
                    let xr = &x[r * k..(r + 1) * k];
                    let want: f64 = wd[c]
                        .iter()
                        .zip(xr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let norm: f64 = wd[c]
                        .iter()
                        .zip(xr)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let got = all[r * n + c] as f64;
                    assert!(
                        (got - want).abs() <= 0.02 * norm + 1e-6,
                        "{dtype:?} ({r},{c}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Products fused into one call split their columns across workers
    /// in groups of 16 counted over all products, so a product whose rows
    /// are not a multiple of 16 shifts the next one's groups against its
    /// packed groups of sixteen rows (partial groups, masked stores). Each
    /// product still gives the bits it gives alone.
    #[test]
    fn fused_products_match_separate_calls() {
        let (k, m) = (512, 5);
        let x = random(m * k, 31);
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let ws: Vec<QWeight> = [20, 36, 7]
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let w = random(n * k, 40 + i as u64);
                    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
                    QWeight::new("w", QTensor::quantize(&w, dtype).unwrap()).unwrap()
                })
                .collect();
            let mut s = Scratch::default();
            let mut fused: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n_out]).collect();
            let mut products: Vec<Product<'_>> = ws
                .iter()
                .zip(fused.iter_mut())
                .map(|(w, out)| Product { w, out })
                .collect();
            matmul(&x, m, k, &mut products, &mut s);
            for (w, got) in ws.iter().zip(&fused) {
                let mut alone = vec![0f32; m * w.n_out];
                matmul(&x, m, k, &mut [Product { w, out: &mut alone }], &mut s);
                assert_eq!(&alone, got, "{dtype:?} n={}", w.n_out);
            }
        }
    }

    #[test]
    fn dot_matches_f64() {
        let (a, b) = (random(77, 4), random(77, 5));
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
    }
}
