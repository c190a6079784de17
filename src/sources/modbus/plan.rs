//! The request planner: which reads cover a set of points.
//!
//! Pure. Points of the same unit and area are sorted by address and merged greedily into
//! one read while the gap to the next point is at most `max_gap` registers (or bits) and
//! the read stays within the area's per-request limit (125 registers for function codes
//! 3/4, 2000 bits for 1/2: Modbus Application Protocol 1.1b3, 6.1-6.4). Invariants, checked
//! by the property test below: every point lies inside exactly one read, no read exceeds
//! its limit, and no two points merged into a read are more than `max_gap` apart.

use serde::Deserialize;

/// A Modbus data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    /// Read/write bits (function codes 1, 5, 15).
    Coil,
    /// Read-only bits (function code 2).
    Discrete,
    /// Read/write registers (function codes 3, 6, 16).
    Holding,
    /// Read-only registers (function code 4).
    Input,
}

impl Area {
    /// Every area name, as the config writes it.
    pub const NAMES: &'static [&'static str] = &["coil", "discrete", "holding", "input"];

    /// Parses a config name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "coil" => Self::Coil,
            "discrete" => Self::Discrete,
            "holding" => Self::Holding,
            "input" => Self::Input,
            _ => return None,
        })
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Coil => "coil",
            Self::Discrete => "discrete",
            Self::Holding => "holding",
            Self::Input => "input",
        }
    }

    /// Whether the area holds bits (coils, discrete inputs) rather than registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Self::Coil | Self::Discrete)
    }

    /// The most a single read of this area may ask for, per the specification.
    pub fn spec_limit(self) -> u16 {
        if self.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        }
    }
}

/// Registers per read (function codes 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// Bits per read (function codes 1 and 2).
pub const MAX_BITS: u16 = 2000;

/// What the planner needs to know of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Unit id the point is read from.
    pub unit: u8,
    /// Its area.
    pub area: Area,
    /// First register or bit.
    pub address: u16,
    /// Registers or bits it takes (at least 1).
    pub width: u16,
}

impl Span {
    /// One past the last register or bit (addresses are 16-bit, so this fits in u32).
    pub fn end(self) -> u32 {
        u32::from(self.address) + u32::from(self.width)
    }
}

/// How far merging may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest unused run (registers or bits) read between two points to save a request.
    pub max_gap: u16,
    /// Registers per read (at most [`MAX_REGISTERS`]).
    pub max_registers: u16,
    /// Bits per read (at most [`MAX_BITS`]).
    pub max_bits: u16,
}

impl Limits {
    fn for_area(self, area: Area) -> u16 {
        if area.is_bits() {
            self.max_bits.clamp(1, MAX_BITS)
        } else {
            self.max_registers.clamp(1, MAX_REGISTERS)
        }
    }
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Unit id.
    pub unit: u8,
    /// Area.
    pub area: Area,
    /// First register or bit.
    pub address: u16,
    /// Registers or bits.
    pub count: u16,
    /// Indices (into the planner's input) of the points inside this read.
    pub points: Vec<usize>,
}

/// Plans the reads for `points`. A point wider than the limit (a long string) cannot be
/// read at all; the config check rejects it, and the planner leaves it out.
pub fn plan(points: &[Span], limits: Limits) -> Vec<Read> {
    let mut order: Vec<usize> = (0..points.len())
        .filter(|&index| {
            let point = points[index];
            point.width >= 1
                && point.width <= limits.for_area(point.area)
                && point.end() <= 0x1_0000
        })
        .collect();
    order.sort_by_key(|&index| {
        let point = points[index];
        (point.unit, point.area, point.address, point.width)
    });
    let mut reads: Vec<Read> = Vec::new();
    let mut current: Option<(Read, u32)> = None;
    for index in order {
        let point = points[index];
        if let Some((read, end)) = &mut current {
            let same_table = read.unit == point.unit && read.area == point.area;
            let gap_ok = u32::from(point.address) <= *end + u32::from(limits.max_gap);
            let new_end = (*end).max(point.end());
            let fits = new_end - u32::from(read.address) <= u32::from(limits.for_area(point.area));
            if same_table && gap_ok && fits {
                *end = new_end;
                read.points.push(index);
                continue;
            }
        }
        if let Some((read, end)) = current.take() {
            reads.push(finish(read, end));
        }
        current = Some((
            Read {
                unit: point.unit,
                area: point.area,
                address: point.address,
                count: 0,
                points: vec![index],
            },
            point.end(),
        ));
    }
    if let Some((read, end)) = current {
        reads.push(finish(read, end));
    }
    reads
}

fn finish(mut read: Read, end: u32) -> Read {
    // At most the area's limit (≤ 2000), as checked when the point was merged.
    read.count = u16::try_from(end - u32::from(read.address)).unwrap_or(u16::MAX);
    read
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: Limits = Limits {
        max_gap: 4,
        max_registers: MAX_REGISTERS,
        max_bits: MAX_BITS,
    };

    fn holding(address: u16, width: u16) -> Span {
        Span {
            unit: 1,
            area: Area::Holding,
            address,
            width,
        }
    }

    #[test]
    fn adjacent_points_make_one_read() {
        let points = [holding(0, 2), holding(2, 2), holding(4, 1)];
        let reads = plan(&points, LIMITS);
        assert_eq!(reads.len(), 1);
        assert_eq!((reads[0].address, reads[0].count), (0, 5));
        assert_eq!(reads[0].points, vec![0, 1, 2]);
    }

    #[test]
    fn gaps_above_max_gap_split() {
        let points = [holding(0, 1), holding(5, 1), holding(11, 1)];
        let reads = plan(&points, LIMITS);
        assert_eq!(reads.len(), 2);
        assert_eq!((reads[0].address, reads[0].count), (0, 6));
        assert_eq!((reads[1].address, reads[1].count), (11, 1));
        let none = Limits {
            max_gap: 0,
            ..LIMITS
        };
        assert_eq!(plan(&points, none).len(), 3);
    }

    #[test]
    fn areas_units_and_limits_split() {
        let mut points = vec![
            holding(0, 1),
            Span {
                area: Area::Input,
                ..holding(1, 1)
            },
            Span {
                unit: 2,
                ..holding(1, 1)
            },
        ];
        assert_eq!(plan(&points, LIMITS).len(), 3);
        points.clear();
        for address in 0..130 {
            points.push(holding(address, 1));
        }
        let reads = plan(&points, LIMITS);
        assert_eq!(reads.len(), 2);
        assert_eq!(reads[0].count, 125);
        let coils: Vec<Span> = (0..2001)
            .map(|address| Span {
                area: Area::Coil,
                ..holding(address, 1)
            })
            .collect();
        let reads = plan(&coils, LIMITS);
        assert_eq!(
            reads.iter().map(|read| read.count).collect::<Vec<_>>(),
            vec![2000, 1]
        );
    }

    #[test]
    fn the_top_of_the_address_space_and_oversize_points() {
        let points = [holding(65_534, 2), holding(65_535, 2), holding(0, 200)];
        let reads = plan(&points, LIMITS);
        assert_eq!(reads.len(), 1);
        assert_eq!((reads[0].address, reads[0].count), (65_534, 2));
    }

    fn span() -> impl Strategy<Value = Span> {
        (
            1u8..3,
            prop_oneof![
                Just(Area::Coil),
                Just(Area::Discrete),
                Just(Area::Holding),
                Just(Area::Input)
            ],
            0u16..400,
            1u16..8,
        )
            .prop_map(|(unit, area, address, width)| Span {
                unit,
                area,
                address,
                width,
            })
    }

    proptest! {
        #[test]
        fn every_point_in_exactly_one_read_within_limits(
            points in proptest::collection::vec(span(), 0..80),
            max_gap in 0u16..20,
            max_registers in 1u16..=125,
            max_bits in 1u16..=2000,
        ) {
            let limits = Limits { max_gap, max_registers, max_bits };
            let reads = plan(&points, limits);
            let mut seen = vec![0usize; points.len()];
            for read in &reads {
                prop_assert!(read.count >= 1);
                prop_assert!(read.count <= limits.for_area(read.area));
                let end = u32::from(read.address) + u32::from(read.count);
                let mut members: Vec<Span> = Vec::new();
                for &index in &read.points {
                    seen[index] += 1;
                    let point = points[index];
                    prop_assert_eq!((point.unit, point.area), (read.unit, read.area));
                    prop_assert!(point.address >= read.address && point.end() <= end);
                    members.push(point);
                }
                members.sort_by_key(|point| point.address);
                let mut reach = members.first().map_or(0, |point| point.end());
                for point in members.iter().skip(1) {
                    prop_assert!(u32::from(point.address) <= reach + u32::from(max_gap));
                    reach = reach.max(point.end());
                }
                prop_assert_eq!(reach, end, "a read ends at its last point");
            }
            for (index, count) in seen.iter().enumerate() {
                let fits = points[index].width <= limits.for_area(points[index].area);
                prop_assert_eq!(*count, usize::from(fits), "point {} in {} reads", index, count);
            }
        }
    }
}
