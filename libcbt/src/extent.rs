//! Extent maps: sorted, disjoint, half-open byte ranges with flags.
//!
//! # Design
//!
//! An [`ExtentMap`] describes which bytes of a disk something applies to: the dirty blocks of a
//! bitmap, the allocated (or zero, or hole) ranges of an image, what one backup holds. Each
//! [`Extent`] is a half-open range `[start, end)` with a `u32` of flags (for NBD block status:
//! the descriptor's flags, e.g. `HOLE | ZERO` for `base:allocation`, `DIRTY` for a bitmap).
//!
//! Invariants, kept by every operation:
//!
//! | invariant | why |
//! |---|---|
//! | no empty extent | an extent always covers at least one byte |
//! | extents are disjoint and sorted by `start` | lookups and merges are `O(log n)` / linear |
//! | two touching extents never carry the same flags | they are coalesced into one |
//!
//! The map is a `BTreeMap<start, (end, flags)>`: inserting one range into a map of a million
//! extents costs `O(log n + k)` where `k` is the number of extents the range overlaps, and the
//! set operations ([`union`](ExtentMap::union), [`intersect`](ExtentMap::intersect),
//! [`subtract`](ExtentMap::subtract)) walk both maps once. Nothing here is quadratic, so a
//! 64 TiB disk with a million extents costs what its extents cost, never what its size costs.
//!
//! # Flags under set operations
//!
//! - `insert(range, flags)` overwrites: the range takes exactly `flags`.
//! - `union` and `intersect` combine the flags of overlapping parts with bitwise OR, so
//!   `dirty ∩ allocation` keeps the allocation's `ZERO` bit.
//! - `subtract` keeps the flags of `self`.

use std::collections::btree_map::{self, BTreeMap};
use std::fmt;
use std::ops::Range;

/// One half-open range `[start, end)` of bytes, with flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte covered.
    pub start: u64,
    /// First byte past the extent; always greater than `start`.
    pub end: u64,
    /// What the range is (meaning set by whoever built the map).
    pub flags: u32,
}

impl Extent {
    /// A new extent. `start < end` is the caller's promise; empty ranges are never stored.
    pub fn new(start: u64, end: u64, flags: u32) -> Self {
        Extent { start, end, flags }
    }

    /// Number of bytes covered.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Never true for an extent taken from a map; kept for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The byte range.
    pub fn range(&self) -> Range<u64> {
        self.start..self.end
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) flags={:#x}",
            self.start, self.end, self.flags
        )
    }
}

/// A set of disjoint byte ranges with flags. See the [module documentation](self).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, u32)>,
    /// Sum of extent lengths, kept up to date so that `total_len` is O(1).
    total: u64,
}

impl fmt::Debug for ExtentMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl ExtentMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of extents (after coalescing).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no byte is covered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total number of bytes covered.
    pub fn total_len(&self) -> u64 {
        self.total
    }

    /// The extents in ascending order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            inner: self.map.iter(),
        }
    }

    /// First byte covered and first byte past the last extent, or `None` when empty.
    pub fn bounds(&self) -> Option<Range<u64>> {
        let first = self.map.first_key_value()?;
        let last = self.map.last_key_value()?;
        Some(*first.0..last.1 .0)
    }

    /// The extent that contains `offset`, if any.
    pub fn get(&self, offset: u64) -> Option<Extent> {
        let (&start, &(end, flags)) = self.map.range(..=offset).next_back()?;
        (offset < end).then_some(Extent { start, end, flags })
    }

    /// True when `offset` is covered.
    pub fn contains(&self, offset: u64) -> bool {
        self.get(offset).is_some()
    }

    /// The extents that overlap `range`, clipped to it.
    pub fn overlapping(&self, range: Range<u64>) -> impl Iterator<Item = Extent> + '_ {
        let Range { start, end } = range;
        // The extent starting before `start` may reach into the range.
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v));
        let inside = self.map.range(start..end.max(start)).map(|(s, v)| (*s, *v));
        before
            .into_iter()
            .chain(inside)
            .map(move |(s, (e, f))| Extent {
                start: s.max(start),
                end: e.min(end),
                flags: f,
            })
    }

    /// Set `range` to `flags`, overwriting whatever covered it. Empty ranges are ignored.
    pub fn insert(&mut self, range: Range<u64>, flags: u32) {
        if range.start >= range.end {
            return;
        }
        self.remove(range.clone());
        self.put_coalescing(range.start, range.end, flags);
    }

    /// Uncover `range`, splitting extents that straddle its ends.
    pub fn remove(&mut self, range: Range<u64>) {
        let Range { start, end } = range;
        if start >= end {
            return;
        }
        // An extent that starts before `start` and reaches into the range is cut, and its
        // tail past `end` (if any) is kept.
        if let Some((&s, &(e, f))) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, (start, f));
                self.total -= e - start;
                if e > end {
                    self.map.insert(end, (e, f));
                    self.total += e - end;
                    return;
                }
            }
        }
        // Extents starting inside the range: drop them, keeping a tail past `end`.
        let inside: Vec<(u64, (u64, u32))> =
            self.map.range(start..end).map(|(s, v)| (*s, *v)).collect();
        for (s, (e, f)) in inside {
            self.map.remove(&s);
            self.total -= e - s;
            if e > end {
                self.map.insert(end, (e, f));
                self.total += e - end;
            }
        }
    }

    /// Put `[start, end)` into a gap (nothing covers it), merging with neighbours that touch it
    /// and carry the same flags.
    fn put_coalescing(&mut self, mut start: u64, mut end: u64, flags: u32) {
        self.total += end - start;
        if let Some((&ps, &(pe, pf))) = self.map.range(..start).next_back() {
            if pe == start && pf == flags {
                self.map.remove(&ps);
                start = ps;
            }
        }
        if let Some(&(ne, nf)) = self.map.get(&end) {
            if nf == flags {
                self.map.remove(&end);
                end = ne;
            }
        }
        self.map.insert(start, (end, flags));
    }

    /// Append an extent that starts at or after the end of the last one. This is the fast
    /// path for building a map from an ordered source (NBD block status replies).
    ///
    /// Returns the extent back when it is empty or would overlap the map.
    pub fn push(&mut self, extent: Extent) -> Result<(), Extent> {
        if extent.start >= extent.end {
            return Err(extent);
        }
        if let Some((_, &(last_end, _))) = self.map.last_key_value() {
            if extent.start < last_end {
                return Err(extent);
            }
        }
        self.put_coalescing(extent.start, extent.end, extent.flags);
        Ok(())
    }

    /// Only the extents whose flags satisfy `keep`.
    pub fn filter(&self, mut keep: impl FnMut(u32) -> bool) -> ExtentMap {
        self.iter().filter(|e| keep(e.flags)).collect()
    }

    /// The same ranges with every flag set to `flags` (coalescing what now touches).
    pub fn with_flags(&self, flags: u32) -> ExtentMap {
        self.iter().map(|e| Extent { flags, ..e }).collect()
    }

    /// Bytes covered by either map; where both cover, the flags are OR-ed.
    pub fn union(&self, other: &ExtentMap) -> ExtentMap {
        self.merge(other, |a, b| match (a, b) {
            (None, None) => None,
            (Some(a), None) => Some(a),
            (None, Some(b)) => Some(b),
            (Some(a), Some(b)) => Some(a | b),
        })
    }

    /// Bytes covered by both maps, with the flags OR-ed.
    pub fn intersect(&self, other: &ExtentMap) -> ExtentMap {
        self.merge(other, |a, b| Some(a? | b?))
    }

    /// Bytes covered by `self` and not by `other`, with the flags of `self`.
    pub fn subtract(&self, other: &ExtentMap) -> ExtentMap {
        self.merge(other, |a, b| if b.is_some() { None } else { a })
    }

    /// A linear sweep over the boundaries of both maps. `pick` decides, for each elementary
    /// piece, whether it is covered in the result and with which flags.
    fn merge(
        &self,
        other: &ExtentMap,
        pick: impl Fn(Option<u32>, Option<u32>) -> Option<u32>,
    ) -> ExtentMap {
        let mut out = ExtentMap::new();
        let mut a = self.iter().peekable();
        let mut b = other.iter().peekable();
        // `pos` is where the next elementary piece starts.
        let mut pos = 0u64;
        loop {
            let (na, nb) = (a.peek().copied(), b.peek().copied());
            let (na, nb) = match (na, nb) {
                (None, None) => break,
                pair => pair,
            };
            // Skip whatever ended before pos.
            if let Some(x) = na {
                if x.end <= pos {
                    a.next();
                    continue;
                }
            }
            if let Some(x) = nb {
                if x.end <= pos {
                    b.next();
                    continue;
                }
            }
            let start = [na, nb]
                .iter()
                .flatten()
                .map(|x| x.start.max(pos))
                .min()
                .unwrap_or(pos);
            let fa = na.filter(|x| x.start <= start).map(|x| x.flags);
            let fb = nb.filter(|x| x.start <= start).map(|x| x.flags);
            // The piece ends at the first boundary after `start` of either map.
            let end = [na, nb]
                .iter()
                .flatten()
                .flat_map(|x| [x.start, x.end])
                .filter(|&p| p > start)
                .min()
                .unwrap_or(start);
            if let Some(flags) = pick(fa, fb) {
                // Pieces come in order, so push cannot fail.
                let _ = out.push(Extent::new(start, end, flags));
            }
            pos = end;
        }
        out
    }

    /// Widen every extent to whole blocks of `block` bytes (start rounded down, end rounded
    /// up, then clipped to `limit`); extents that come to overlap are merged with OR-ed flags.
    ///
    /// `block` must be a power of two; any other value (including 0) returns a copy.
    pub fn align_out(&self, block: u64, limit: u64) -> ExtentMap {
        if !block.is_power_of_two() {
            return self.clone();
        }
        let mask = block - 1;
        // Widened extents keep their order of `start` but may overlap their neighbours, so a
        // sweep over open/close events with a counter per flag bit resolves the OR.
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(self.len() * 2);
        for e in self.iter() {
            let start = e.start & !mask;
            let end = e.end.checked_add(mask).map_or(!mask, |v| v & !mask);
            let end = end.min(limit);
            if start < end {
                events.push((start, true, e.flags));
                events.push((end, false, e.flags));
            }
        }
        events.sort_unstable_by_key(|&(pos, open, _)| (pos, open));
        let mut out = ExtentMap::new();
        let mut active = 0usize;
        let mut bits = [0u32; 32];
        let mut prev = 0u64;
        for (pos, open, flags) in events {
            if active > 0 && pos > prev {
                let f = (0..32)
                    .filter(|&i| bits[i] > 0)
                    .fold(0u32, |acc, i| acc | (1 << i));
                // Pieces come in order, so push cannot fail.
                let _ = out.push(Extent::new(prev, pos, f));
            }
            for (i, count) in bits.iter_mut().enumerate() {
                if flags & (1 << i) != 0 {
                    if open {
                        *count += 1;
                    } else {
                        *count -= 1;
                    }
                }
            }
            if open {
                active += 1;
            } else {
                active -= 1;
            }
            prev = pos;
        }
        out
    }

    /// Split the extents into pieces of at most `max` bytes that never cross a multiple of
    /// `max`, so that the same byte always falls into the same chunk slot. `max == 0` yields
    /// the extents unsplit.
    pub fn chunks(&self, max: u64) -> Chunks<'_> {
        Chunks {
            inner: self.iter(),
            max,
            current: None,
        }
    }
}

impl FromIterator<Extent> for ExtentMap {
    /// Builds a map from extents in any order; later extents overwrite earlier ones.
    fn from_iter<I: IntoIterator<Item = Extent>>(iter: I) -> Self {
        let mut map = ExtentMap::new();
        for e in iter {
            if map.push(e).is_err() {
                map.insert(e.range(), e.flags);
            }
        }
        map
    }
}

impl<'a> IntoIterator for &'a ExtentMap {
    type Item = Extent;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Iterator over the extents of a map, in order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    inner: btree_map::Iter<'a, u64, (u64, u32)>,
}

impl Iterator for Iter<'_> {
    type Item = Extent;
    fn next(&mut self) -> Option<Extent> {
        self.inner
            .next()
            .map(|(&start, &(end, flags))| Extent { start, end, flags })
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Extent> {
        self.inner
            .next_back()
            .map(|(&start, &(end, flags))| Extent { start, end, flags })
    }
}

/// Iterator returned by [`ExtentMap::chunks`].
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    inner: Iter<'a>,
    max: u64,
    current: Option<Extent>,
}

impl Iterator for Chunks<'_> {
    type Item = Extent;
    fn next(&mut self) -> Option<Extent> {
        let cur = match self.current.take() {
            Some(c) => c,
            None => self.inner.next()?,
        };
        if self.max == 0 {
            return Some(cur);
        }
        // Next multiple of max strictly above cur.start.
        let boundary = (cur.start / self.max)
            .checked_add(1)
            .and_then(|n| n.checked_mul(self.max))
            .unwrap_or(u64::MAX);
        if cur.end <= boundary {
            return Some(cur);
        }
        self.current = Some(Extent {
            start: boundary,
            ..cur
        });
        Some(Extent {
            end: boundary,
            ..cur
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The model: a flag value for every covered byte of a small address space.
    type Model = BTreeMap<u64, u32>;

    const SPACE: u64 = 96;

    fn to_model(m: &ExtentMap) -> Model {
        m.iter()
            .flat_map(|e| (e.start..e.end).map(move |b| (b, e.flags)))
            .collect()
    }

    fn check_invariants(m: &ExtentMap) {
        let mut prev: Option<Extent> = None;
        let mut total = 0;
        for e in m.iter() {
            assert!(e.start < e.end, "empty extent {e:?}");
            if let Some(p) = prev {
                assert!(p.end <= e.start, "overlap {p:?} {e:?}");
                assert!(
                    !(p.end == e.start && p.flags == e.flags),
                    "not coalesced {p:?} {e:?}"
                );
            }
            total += e.len();
            prev = Some(e);
        }
        assert_eq!(total, m.total_len());
    }

    fn arb_ops() -> impl Strategy<Value = Vec<(bool, u64, u64, u32)>> {
        prop::collection::vec((any::<bool>(), 0..SPACE, 0..24u64, 0..3u32), 0..24)
    }

    fn build(ops: &[(bool, u64, u64, u32)]) -> (ExtentMap, Model) {
        let mut m = ExtentMap::new();
        let mut model = Model::new();
        for &(ins, start, len, flags) in ops {
            let end = (start + len).min(SPACE);
            if ins {
                m.insert(start..end, flags);
                for b in start..end {
                    model.insert(b, flags);
                }
            } else {
                m.remove(start..end);
                for b in start..end {
                    model.remove(&b);
                }
            }
        }
        (m, model)
    }

    proptest! {
        #[test]
        fn insert_and_remove_match_model(ops in arb_ops()) {
            let (m, model) = build(&ops);
            check_invariants(&m);
            prop_assert_eq!(to_model(&m), model);
        }

        #[test]
        fn set_operations_match_model(a in arb_ops(), b in arb_ops()) {
            let (ma, xa) = build(&a);
            let (mb, xb) = build(&b);
            let u = ma.union(&mb);
            let i = ma.intersect(&mb);
            let s = ma.subtract(&mb);
            for m in [&u, &i, &s] {
                check_invariants(m);
            }
            let mut xu = xa.clone();
            for (k, v) in &xb {
                *xu.entry(*k).or_insert(0) |= v;
            }
            let xi: Model = xa.iter().filter_map(|(k, v)| xb.get(k).map(|w| (*k, v | w))).collect();
            let xs: Model = xa.iter().filter(|(k, _)| !xb.contains_key(k)).map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(to_model(&u), xu);
            prop_assert_eq!(to_model(&i), xi);
            prop_assert_eq!(to_model(&s), xs);
        }

        #[test]
        fn align_out_matches_model(ops in arb_ops(), shift in 0..5u32, limit in 0..SPACE + 8) {
            let block = 1u64 << shift;
            let (m, model) = build(&ops);
            let aligned = m.align_out(block, limit);
            check_invariants(&aligned);
            let mut expect = Model::new();
            for (b, f) in &model {
                let first = b & !(block - 1);
                for x in first..(first + block).min(limit) {
                    *expect.entry(x).or_insert(0) |= f;
                }
            }
            prop_assert_eq!(to_model(&aligned), expect);
        }

        #[test]
        fn chunks_cover_exactly_and_respect_max(ops in arb_ops(), max in 1..20u64) {
            let (m, model) = build(&ops);
            let mut seen = Model::new();
            for c in m.chunks(max) {
                prop_assert!(c.len() <= max && c.start < c.end);
                prop_assert_eq!(c.start / max, (c.end - 1) / max, "chunk crosses a boundary");
                for b in c.range() {
                    prop_assert!(seen.insert(b, c.flags).is_none());
                }
            }
            prop_assert_eq!(seen, model);
        }

        #[test]
        fn overlapping_and_get_match_model(ops in arb_ops(), start in 0..SPACE, len in 0..40u64) {
            let (m, model) = build(&ops);
            let end = start + len;
            let got: Model = m.overlapping(start..end).flat_map(|e| (e.start..e.end).map(move |b| (b, e.flags))).collect();
            let expect: Model = model.range(start..end).map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(got, expect);
            for b in 0..SPACE {
                prop_assert_eq!(m.get(b).map(|e| e.flags), model.get(&b).copied());
            }
        }
    }

    #[test]
    fn push_rejects_overlap_and_empty() {
        let mut m = ExtentMap::new();
        assert!(m.push(Extent::new(10, 20, 1)).is_ok());
        assert!(m.push(Extent::new(15, 30, 1)).is_err());
        assert!(m.push(Extent::new(30, 30, 1)).is_err());
        assert!(m.push(Extent::new(20, 30, 1)).is_ok());
        assert_eq!(m.len(), 1, "touching extents with equal flags coalesce");
        assert_eq!(m.total_len(), 20);
    }

    #[test]
    fn million_extents_on_64tib_disk_stay_linear() {
        // A million 4 KiB extents spread over 64 TiB, built in order and then out of order.
        const N: u64 = 1_000_000;
        let disk = 64u64 << 40;
        let stride = disk / N;
        let mut a = ExtentMap::new();
        for i in 0..N {
            let s = i * stride;
            a.push(Extent::new(s, s + 4096, 1)).expect("ordered push");
        }
        assert_eq!(a.len() as u64, N);
        // Out of order inserts (a permutation by a large odd multiplier).
        let mut b = ExtentMap::new();
        for i in 0..N {
            let j = (i * 7_777_777) % N;
            let s = j * stride + 2048;
            b.insert(s..s + 4096, 2);
        }
        assert_eq!(b.len() as u64, N);
        let u = a.union(&b);
        let i = a.intersect(&b);
        let s = a.subtract(&b);
        assert_eq!(i.total_len(), N * 2048);
        assert_eq!(s.total_len(), N * 2048);
        assert_eq!(u.total_len(), N * (4096 + 2048));
        let (mut pieces, mut bytes) = (0u64, 0u64);
        for c in u.chunks(1 << 20) {
            assert!(c.len() <= 1 << 20);
            pieces += 1;
            bytes += c.len();
        }
        assert_eq!(bytes, u.total_len());
        assert!(pieces >= 3 * N);
        let aligned = u.align_out(65536, disk);
        // The extents are far apart, so each one widens on its own.
        let expect: u64 = (0..N)
            .map(|i| {
                let (s, e) = (i * stride, i * stride + 6144);
                e.div_ceil(65536) * 65536 - s / 65536 * 65536
            })
            .sum();
        assert_eq!(aligned.total_len(), expect);
        assert!(aligned.len() as u64 >= N && aligned.len() as u64 <= 2 * N);
    }
}
