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
//! The dot products are candle's `GgmlType::vec_dot` (AVX2 for Q4_0, Q8_0
//! and the K-quants), except for Q4_1 and Q5_0, whose candle versions are
//! scalar: those two get AVX2 kernels here (SmolLM2 is almost all Q4_1, the
//! Qwen 0.5B GGUF mostly Q5_0).

use std::ops::Range;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};

use super::DecoderError;

/// A weight matrix `[n_out, k_in]` in its GGUF block format, with the
/// kernels chosen for that format at load time.
pub struct QWeight {
    tensor: QTensor,
    pub(crate) n_out: usize,
    pub(crate) k_in: usize,
    kernel: Kernel,
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

/// The dot product a weight format uses. Defaults to candle's; overridden
/// where candle's is scalar.
trait Dot: GgmlType + 'static {
    fn dot(k: usize, w: &[Self], x: &[Self::VecDotType]) -> f32 {
        Self::vec_dot(k, w, x)
    }
}

impl Dot for f32 {}
impl Dot for BlockQ4_0 {}
impl Dot for BlockQ5_1 {}
impl Dot for BlockQ8_0 {}
impl Dot for BlockQ2K {}
impl Dot for BlockQ3K {}
impl Dot for BlockQ4K {}
impl Dot for BlockQ5K {}
impl Dot for BlockQ6K {}

impl Dot for BlockQ4_1 {
    fn dot(k: usize, w: &[Self], x: &[BlockQ8_1]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above), the
            // mirrors have candle's layouts (asserted in `avx2`), and the
            // slices are whole blocks of equal count.
            return unsafe { x86::dot_q4_1_q8_1(&w[..k / 32], &x[..k / 32]) };
        }
        Self::vec_dot(k, w, x)
    }
}

impl Dot for BlockQ5_0 {
    fn dot(k: usize, w: &[Self], x: &[BlockQ8_0]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: as for Q4_1.
            return unsafe { x86::dot_q5_0_q8_0(&w[..k / 32], &x[..k / 32]) };
        }
        Self::vec_dot(k, w, x)
    }
}

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
    for c in cols {
        let wr = &w[c * kb..(c + 1) * kb];
        for r in 0..m {
            let v = T::dot(k, wr, &x[r * kb..(r + 1) * kb]);
            // SAFETY: in bounds by the caller's contract; only this call
            // writes column `c`.
            unsafe { *out.add(r * out_stride + c) = v };
        }
    }
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
    /// Wraps a CPU `QTensor` of shape `[n_out, k_in]`.
    pub fn new(name: &str, tensor: QTensor) -> Result<QWeight, DecoderError> {
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
/// across calls (no allocation in the decode loop once warm).
#[derive(Default)]
pub struct Scratch {
    bufs: Vec<(GgmlDType, usize, Vec<u64>)>,
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
    struct Job {
        w_bytes: usize,
        w_len: usize,
        k: usize,
        n: usize,
        xq_idx: usize,
        xq_len: usize,
        out: usize,
        dot: DotCols,
        first_col: usize,
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
            out: p.out.as_mut_ptr() as usize,
            dot: p.w.kernel.dot_cols,
            first_col: total_cols,
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
    //! AVX2 dot products for the two formats candle leaves scalar. Each
    //! block's integer dot product is exact; the f32 accumulation order is
    //! fixed (one 8-lane accumulator, then a fixed horizontal sum).
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ8_0, BlockQ8_1};
    use std::arch::x86_64::*;

    // Mirrors of candle's block layouts (its fields are crate-private).
    #[repr(C)]
    struct Q4_1 {
        d: u16,
        m: u16,
        qs: [u8; 16],
    }
    #[repr(C)]
    struct Q8_1 {
        d: u16,
        s: u16,
        qs: [i8; 32],
    }
    #[repr(C)]
    struct Q5_0 {
        d: u16,
        qh: [u8; 4],
        qs: [u8; 16],
    }
    #[repr(C)]
    struct Q8_0 {
        d: u16,
        qs: [i8; 32],
    }
    const _: () = assert!(std::mem::size_of::<Q4_1>() == std::mem::size_of::<BlockQ4_1>());
    const _: () = assert!(std::mem::size_of::<Q8_1>() == std::mem::size_of::<BlockQ8_1>());
    const _: () = assert!(std::mem::size_of::<Q5_0>() == std::mem::size_of::<BlockQ5_0>());
    const _: () = assert!(std::mem::size_of::<Q8_0>() == std::mem::size_of::<BlockQ8_0>());

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
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

    /// # Safety
    /// AVX2, FMA and F16C must be available; `w` and `x` have equal length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (wb, xb) in w.iter().zip(x) {
            // SAFETY: same layouts (asserted above).
            let (wb, xb) = unsafe {
                (
                    &*(wb as *const _ as *const Q4_1),
                    &*(xb as *const _ as *const Q8_1),
                )
            };
            mins += f16(wb.m) * f16(xb.s);
            let d = _mm256_set1_ps(f16(wb.d) * f16(xb.d));
            let qx = unsafe { nibbles(wb.qs.as_ptr()) };
            let qy = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            acc = _mm256_fmadd_ps(d, madd_us(qx, qy), acc);
        }
        hsum(acc) + mins
    }

    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q5_0_q8_0(w: &[BlockQ5_0], x: &[BlockQ8_0]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        let mut acc = _mm256_setzero_ps();
        for (wb, xb) in w.iter().zip(x) {
            // SAFETY: same layouts (asserted above).
            let (wb, xb) = unsafe {
                (
                    &*(wb as *const _ as *const Q5_0),
                    &*(xb as *const _ as *const Q8_0),
                )
            };
            let d = _mm256_set1_ps(f16(wb.d) * f16(xb.d));
            let lo = unsafe { nibbles(wb.qs.as_ptr()) };
            // q - 16 as i8: where the fifth bit is clear, set the top four.
            let hi = _mm256_andnot_si256(
                bits_to_bytes(u32::from_le_bytes(wb.qh)),
                _mm256_set1_epi8(0xF0u8 as i8),
            );
            let qx = _mm256_or_si256(lo, hi);
            let qy = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            let q = madd_us(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Our AVX2 Q4_1 and Q5_0 dot products against candle's scalar ones on
    /// random blocks. Both sum exact per-block integer products; only the
    /// f32 accumulation order differs, so the difference is bounded by a few
    /// ulps of the sum of absolute block terms: 1e-5 relative to that sum.
    #[test]
    fn avx2_dots_match_candle_scalar() {
        let k = 1024;
        for (dtype, seed) in [(GgmlDType::Q4_1, 1u64), (GgmlDType::Q5_0, 2)] {
            let w = Tensor::from_vec(random(4 * k, seed), (4, k), &Device::Cpu).unwrap();
            let qw = QWeight::new("w", QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let x = random(k, seed + 10);
            let mut out = vec![0f32; 4];
            let mut s = Scratch::default();
            matmul(
                &x,
                1,
                k,
                &mut [Product {
                    w: &qw,
                    out: &mut out,
                }],
                &mut s,
            );
            let xq = s.bytes(0, (qw.kernel.act_row_bytes)(k)).to_vec();
            for (r, &got) in out.iter().enumerate() {
                let rb = qw.row_bytes();
                let wr = &qw.bytes()[r * rb..(r + 1) * rb];
                let (want, scale) = match dtype {
                    GgmlDType::Q4_1 => {
                        let w: &[BlockQ4_1] = blocks(wr);
                        let x: &[BlockQ8_1] = blocks(&xq);
                        (BlockQ4_1::vec_dot_unopt(k, w, x), x.len() as f32)
                    }
                    _ => {
                        let w: &[BlockQ5_0] = blocks(wr);
                        let x: &[BlockQ8_0] = blocks(&xq);
                        (BlockQ5_0::vec_dot_unopt(k, w, x), x.len() as f32)
                    }
                };
                let tol = 1e-5 * scale * (want.abs() + 1.0);
                assert!(
                    (got - want).abs() <= tol,
                    "{dtype:?} row {r}: {got} vs {want}"
                );
            }
        }
    }

    /// Rows computed alone and in a batch are bit-identical, for every
    /// format the models use.
    #[test]
    fn matmul_rows_are_batch_independent() {
        let (n, k, m) = (40, 512, 7);
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

    #[test]
    fn dot_matches_f64() {
        let (a, b) = (random(77, 4), random(77, 5));
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
    }
}
