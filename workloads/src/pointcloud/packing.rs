//! How the tensor-core SLA forward kernel (`kernels.cu`, `sla_fwd_grouped`)
//! shares out windows among warps: each window gets warps in proportion to
//! its voxels, and windows are packed into blocks of [`WARPS`] warps. Pure
//! host code, built once per layout (untimed), so it is compiled and tested
//! in every build; `cuda.rs` uploads what it returns.
//!
//! Why. The other work list (`cuda.rs`, `WorkList`) gives every window over
//! a threshold a whole block of eight warps and packs the rest eight to a
//! block, one warp each. A window of 40 voxels then has eight warps for
//! five chunks of 8 voxels (phase 1) and three of 16 (phase 2), so most of
//! its block waits, and the grid needs several waves of blocks on a
//! Waymo-scale frame. Here a window of `n` voxels gets
//! `clamp(ceil(n / per_warp), 1, WARPS)` warps, contiguous within one
//! block, and blocks are filled best-fit in decreasing order of that count
//! (the largest windows first, so the longest-running blocks start first).

/// Warps per block of the SLA kernels (`WARPS` in kernels.cu).
pub const WARPS: usize = 8;

/// One warp's work item, as the kernel decodes it:
/// `(window << 8) | (multi << 7) | (first << 4) | step`, where `step` is
/// the number of warps sharing the window (1..=8; 0 marks an empty slot),
/// `first` this warp's index among them, and `multi` is set on every slot
/// of a block that holds a window shared by more than one warp (the block
/// then meets at a barrier to sum the shared windows' states).
pub fn encode(window: u32, multi: bool, first: u32, step: u32) -> i32 {
    debug_assert!(window < 1 << 23 && first < 8 && step <= 8);
    ((window << 8) | (u32::from(multi) << 7) | (first << 4) | step) as i32
}

/// The warps given to a window of `n` voxels.
pub fn warps_for(n: u32, per_warp: u32) -> u32 {
    n.div_ceil(per_warp.max(1)).clamp(1, WARPS as u32)
}

/// Work items, [`WARPS`] per block, block-major; empty windows get none.
/// Fails if there are more windows than the item format can name.
pub fn grouped_items(counts: &[u32], per_warp: u32) -> Result<Vec<i32>, String> {
    if counts.len() >= 1 << 23 {
        return Err(format!(
            "{} windows: the grouped work list names at most {} (use BENCH_SUITE_SLA_GROUP=0)",
            counts.len(),
            (1 << 23) - 1
        ));
    }
    let mut order: Vec<u32> = (0..counts.len() as u32)
        .filter(|&w| counts[w as usize] > 0)
        .collect();
    order.sort_by_key(|&w| {
        let n = counts[w as usize];
        (
            std::cmp::Reverse(warps_for(n, per_warp)),
            std::cmp::Reverse(n),
            w,
        )
    });
    // blocks[b]: (window, first, step) per filled slot; open[r]: blocks
    // with r free slots.
    let mut blocks: Vec<Vec<(u32, u32, u32)>> = Vec::new();
    let mut open: Vec<Vec<usize>> = vec![Vec::new(); WARPS];
    for w in order {
        let g = warps_for(counts[w as usize], per_warp);
        let b = match (g as usize..WARPS).find(|&r| !open[r].is_empty()) {
            Some(r) => open[r].pop().expect("non-empty"),
            None => {
                blocks.push(Vec::with_capacity(WARPS));
                blocks.len() - 1
            }
        };
        blocks[b].extend((0..g).map(|f| (w, f, g)));
        let free = WARPS - blocks[b].len();
        if free > 0 {
            open[free].push(b);
        }
    }
    let mut items = Vec::with_capacity(blocks.len() * WARPS);
    for slots in &blocks {
        let multi = slots.iter().any(|&(_, _, g)| g > 1);
        items.extend(slots.iter().map(|&(w, f, g)| encode(w, multi, f, g)));
        items.extend((slots.len()..WARPS).map(|_| encode(0, multi, 0, 0)));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(it: i32) -> (u32, bool, u32, u32) {
        let u = it as u32;
        (u >> 8, (u >> 7) & 1 == 1, (u >> 4) & 7, u & 15)
    }

    #[test]
    fn every_window_gets_its_warps_once_and_contiguously() {
        // A long-tailed mix, with an empty window and a few giants.
        let counts: Vec<u32> = (0..500u32)
            .map(|i| match i % 50 {
                0 => 0,
                1 => 900,
                2..=5 => 33 + 17 * (i % 7),
                _ => 1 + (i * 7919) % 40,
            })
            .collect();
        let per_warp = 32;
        let items = grouped_items(&counts, per_warp).unwrap();
        assert_eq!(items.len() % WARPS, 0);
        let mut seen = vec![0u32; counts.len()];
        for block in items.chunks(WARPS) {
            let d: Vec<_> = block.iter().map(|&x| decode(x)).collect();
            let multi = d.iter().any(|&(_, _, _, g)| g > 1);
            let mut s = 0;
            while s < WARPS {
                let (w, m, f, g) = d[s];
                assert_eq!(
                    m, multi,
                    "the multi flag is the same on every slot of a block"
                );
                if g == 0 {
                    assert!(d[s..].iter().all(|x| x.3 == 0), "empty slots come last");
                    break;
                }
                assert_eq!(f, 0, "a window's warps start at its first");
                for (k, &(w2, _, f2, g2)) in d[s..s + g as usize].iter().enumerate() {
                    assert_eq!((w2, f2, g2), (w, k as u32, g));
                }
                seen[w as usize] += g;
                s += g as usize;
            }
        }
        for (w, &n) in counts.iter().enumerate() {
            let want = if n == 0 { 0 } else { warps_for(n, per_warp) };
            assert_eq!(seen[w], want, "window {w} of {n} voxels");
        }
        // Best fit wastes little here: the one-warp windows fill the gaps.
        let used: u32 = seen.iter().sum();
        let blocks = (items.len() / WARPS) as u32;
        assert!(
            blocks <= used.div_ceil(WARPS as u32) + WARPS as u32,
            "{blocks} blocks for {used} warps"
        );
    }

    #[test]
    fn warps_follow_the_voxel_count() {
        assert_eq!(warps_for(1, 32), 1);
        assert_eq!(warps_for(32, 32), 1);
        assert_eq!(warps_for(33, 32), 2);
        assert_eq!(warps_for(100, 32), 4);
        assert_eq!(warps_for(10_000, 32), 8);
        assert_eq!(
            warps_for(5, 0),
            5,
            "a zero share is taken as one voxel a warp"
        );
        // The largest windows come first.
        let items = grouped_items(&[3, 300, 40], 32).unwrap();
        assert_eq!(decode(items[0]), (1, true, 0, 8));
        assert_eq!(decode(items[8]), (2, true, 0, 2));
        assert_eq!(decode(items[10]), (0, true, 0, 1));
        assert_eq!(decode(items[11]).3, 0);
    }
}
