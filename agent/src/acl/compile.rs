//! Compiling an ACL into the tables the programs search: per family and direction, the
//! rules' prefixes cut into sorted, disjoint intervals (the most specific prefix of
//! each address range wins), each pointing at the rules that decide for it, and a
//! first-level index over them.

use super::*;

impl Acl {
    /// Distinct prefixes of one family and direction, sorted by (start, length), each
    /// with its rules in NAD order.
    pub(super) fn prefixes(&self, dir: u32, v4: bool) -> Result<Vec<Prefix>, AclError> {
        let max = if v4 { 32 } else { 128 };
        let mut out: std::collections::BTreeMap<(u128, u8), Vec<AclRule>> = Default::default();
        for (i, r) in self.rules.iter().enumerate() {
            if r.addr.is_ipv4() != v4 || !r.direction.applies(dir) {
                continue;
            }
            let rules = out.entry((bits(r.addr), r.prefix)).or_default();
            if rules.len() == MAX_RULES_PER_CIDR as usize {
                return Err(rule_err(
                    i,
                    format!(
                        "more than {MAX_RULES_PER_CIDR} rules on {}/{} for {}",
                        r.addr,
                        r.prefix,
                        if dir == DIR_INGRESS {
                            "ingress"
                        } else {
                            "egress"
                        }
                    ),
                ));
            }
            let (port_lo, port_hi) = r.ports.unwrap_or((0, 0));
            rules.push(AclRule {
                proto: r.proto,
                action: if r.deny { ACT_DENY } else { ACT_ALLOW },
                port_lo,
                port_hi,
                id: i as u16,
            });
        }
        Ok(out
            .into_iter()
            .map(|((start, len), rules)| Prefix {
                start,
                end: start | !mask(len, max) & mask(max, max),
                rules,
            })
            .collect())
    }

    /// The sorted, disjoint intervals of one family and direction: (start, span), and
    /// the rules the spans point into.
    pub fn intervals(&self, dir: u32, v4: bool) -> (Vec<(u128, Span)>, Vec<AclRule>) {
        let max_addr: u128 = if v4 { u32::MAX as u128 } else { u128::MAX };
        let prefixes = self
            .prefixes(dir, v4)
            .expect("checked when the ACL was parsed");
        let mut rules = Vec::new();
        let mut spans = Vec::new();
        for p in &prefixes {
            spans.push(Span {
                first: rules.len() as u16,
                count: p.rules.len() as u16,
            });
            rules.extend_from_slice(&p.rules);
        }
        let mut out: Vec<(u128, Span)> = vec![(0, Span::default())];
        let mut emit = |at: u128, span: Span| {
            let last = out.last_mut().expect("starts with one");
            if last.0 == at {
                last.1 = span;
            } else if last.1 != span {
                out.push((at, span));
            }
        };
        // CIDRs nest or are disjoint: a walk in (start, length) order with a stack of
        // the enclosing prefixes gives, for each piece, the innermost one.
        let mut stack: Vec<(u128, Span)> = Vec::new();
        let close = |stack: &mut Vec<(u128, Span)>, emit: &mut dyn FnMut(u128, Span)| {
            let (end, _) = stack.pop().expect("non-empty");
            if end < max_addr {
                let outer = stack.last().map(|s| s.1).unwrap_or_default();
                emit(end + 1, outer);
            }
        };
        for (p, span) in prefixes.iter().zip(spans) {
            while stack.last().is_some_and(|(end, _)| *end < p.start) {
                close(&mut stack, &mut emit);
            }
            emit(p.start, span);
            stack.push((p.end, span));
        }
        while !stack.is_empty() {
            close(&mut stack, &mut emit);
        }
        (out, rules)
    }

    /// The four tables (IPv4 ingress, egress, IPv6 ingress, egress: the order of
    /// `table_index`), each as intervals and the rules their spans point into.
    pub fn tables(&self) -> [Table; 4] {
        [
            (false, DIR_INGRESS),
            (false, DIR_EGRESS),
            (true, DIR_INGRESS),
            (true, DIR_EGRESS),
        ]
        .map(|(v6, dir)| {
            let (intervals, rules) = self.intervals(dir, !v6);
            Table { intervals, rules }
        })
    }
}

/// One compiled table: sorted interval starts with their spans, and the rules.
pub struct Table {
    pub intervals: Vec<(u128, Span)>,
    pub rules: Vec<AclRule>,
}

/// A table's first-level index (see `TableRef` in ebpf/common): buckets of equal
/// address width from `lo`, each naming the intervals an address in it can be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub lo: u128,
    pub bits: u32,
    pub shift: u32,
    pub buckets: Vec<Bucket>,
}

impl Table {
    /// The first-level index of this table, for addresses of `width` bits (32 or 128).
    /// 2^bits buckets, fewer than the starts they divide, plus the last: an address
    /// is searched among the few intervals of its bucket, not all of them.
    pub fn index(&self, width: u32) -> Index {
        let n = self.intervals.len();
        let max: u128 = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        if n < 2 {
            // Every address is in interval 0: below `lo` (or the one bucket) says so.
            return Index {
                lo: max,
                bits: 0,
                shift: 0,
                buckets: vec![Bucket { first: 0, last: 0 }; 2],
            };
        }
        let lo = self.intervals[1].0;
        let span = self.intervals[n - 1].0 - lo;
        let span_bits = 128 - span.leading_zeros();
        // floor(log2(starts after 0)), so the buckets are no more than the intervals.
        let bits = (usize::BITS - 1 - (n - 1).leading_zeros())
            .min(ACL_INDEX_MAX_BITS)
            .min(span_bits);
        // At most 127: 128 would need span_bits 128 with bits 0, i.e. one start after 0
        // and a span of 0.
        let shift = span_bits - bits;
        let last = 1usize << bits;
        // The interval holding each bucket's first address, then each bucket's range.
        let mut firsts = Vec::with_capacity(last + 1);
        let mut i = 0usize;
        for b in 0..=last {
            // The bucket's first address (past the last address: the last).
            let at = if (b as u128) > (max - lo) >> shift {
                max
            } else {
                lo + ((b as u128) << shift)
            };
            while i + 1 < n && self.intervals[i + 1].0 <= at {
                i += 1;
            }
            firsts.push(i as u32);
        }
        let buckets = (0..=last)
            .map(|b| Bucket {
                first: firsts[b],
                last: if b == last {
                    n as u32 - 1
                } else {
                    firsts[b + 1]
                },
            })
            .collect();
        Index {
            lo,
            bits,
            shift,
            buckets,
        }
    }
}

pub(super) struct Prefix {
    start: u128,
    end: u128,
    rules: Vec<AclRule>,
}

const _: () = assert!(ACL_INTERVALS > 2 * MAX_ACL_RULES as usize);
