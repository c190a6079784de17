//! Unit conversion for `remap`: each unit is a factor and an offset to its dimension's
//! base unit, so any two units of one dimension convert into each other.

/// What a unit measures; only units of one dimension convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Kelvin.
    Temperature,
    /// Pascal.
    Pressure,
    /// Metre.
    Length,
    /// Metre per second.
    Speed,
    /// Joule.
    Energy,
    /// Watt.
    Power,
    /// Kilogram.
    Mass,
    /// Cubic metre.
    Volume,
    /// Second.
    Time,
}

/// `(name, dimension, factor, offset)`: `base = value * factor + offset`.
const UNITS: &[(&str, Dimension, f64, f64)] = &[
    ("K", Dimension::Temperature, 1.0, 0.0),
    ("degC", Dimension::Temperature, 1.0, 273.15),
    (
        "degF",
        Dimension::Temperature,
        5.0 / 9.0,
        273.15 - 32.0 * 5.0 / 9.0,
    ),
    ("Pa", Dimension::Pressure, 1.0, 0.0),
    ("hPa", Dimension::Pressure, 100.0, 0.0),
    ("kPa", Dimension::Pressure, 1000.0, 0.0),
    ("MPa", Dimension::Pressure, 1e6, 0.0),
    ("bar", Dimension::Pressure, 1e5, 0.0),
    ("mbar", Dimension::Pressure, 100.0, 0.0),
    ("psi", Dimension::Pressure, 6_894.757_293_168, 0.0),
    ("m", Dimension::Length, 1.0, 0.0),
    ("km", Dimension::Length, 1000.0, 0.0),
    ("cm", Dimension::Length, 0.01, 0.0),
    ("mm", Dimension::Length, 0.001, 0.0),
    ("in", Dimension::Length, 0.0254, 0.0),
    ("ft", Dimension::Length, 0.3048, 0.0),
    ("mi", Dimension::Length, 1609.344, 0.0),
    ("m/s", Dimension::Speed, 1.0, 0.0),
    ("km/h", Dimension::Speed, 1.0 / 3.6, 0.0),
    ("mph", Dimension::Speed, 0.447_04, 0.0),
    ("kn", Dimension::Speed, 1852.0 / 3600.0, 0.0),
    ("J", Dimension::Energy, 1.0, 0.0),
    ("kJ", Dimension::Energy, 1000.0, 0.0),
    ("Wh", Dimension::Energy, 3600.0, 0.0),
    ("kWh", Dimension::Energy, 3.6e6, 0.0),
    ("W", Dimension::Power, 1.0, 0.0),
    ("kW", Dimension::Power, 1000.0, 0.0),
    ("MW", Dimension::Power, 1e6, 0.0),
    ("hp", Dimension::Power, 745.699_872, 0.0),
    ("kg", Dimension::Mass, 1.0, 0.0),
    ("g", Dimension::Mass, 0.001, 0.0),
    ("t", Dimension::Mass, 1000.0, 0.0),
    ("lb", Dimension::Mass, 0.453_592_37, 0.0),
    ("m3", Dimension::Volume, 1.0, 0.0),
    ("l", Dimension::Volume, 0.001, 0.0),
    ("ml", Dimension::Volume, 1e-6, 0.0),
    ("gal", Dimension::Volume, 0.003_785_411_784, 0.0),
    ("s", Dimension::Time, 1.0, 0.0),
    ("ms", Dimension::Time, 0.001, 0.0),
    ("min", Dimension::Time, 60.0, 0.0),
    ("h", Dimension::Time, 3600.0, 0.0),
];

/// A conversion from one unit to another, as `value * factor + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversion {
    /// Multiplier.
    pub factor: f64,
    /// Added after multiplying.
    pub offset: f64,
}

/// The conversion between two units, or why there is none.
pub fn conversion(from: &str, to: &str) -> Result<Conversion, String> {
    let lookup = |name: &str| {
        UNITS
            .iter()
            .find(|unit| unit.0 == name)
            .ok_or_else(|| format!("unknown unit {name:?}; known units: {}", known()))
    };
    let (_, from_dimension, from_factor, from_offset) = lookup(from)?;
    let (_, to_dimension, to_factor, to_offset) = lookup(to)?;
    if from_dimension != to_dimension {
        return Err(format!(
            "cannot convert {from:?} ({from_dimension:?}) to {to:?} ({to_dimension:?})"
        ));
    }
    // base = v * ff + fo; result = (base - to) / tf
    Ok(Conversion {
        factor: from_factor / to_factor,
        offset: (from_offset - to_offset) / to_factor,
    })
}

fn known() -> String {
    UNITS
        .iter()
        .map(|unit| unit.0)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(value: f64, from: &str, to: &str) -> f64 {
        let conversion = conversion(from, to).expect("known units");
        value * conversion.factor + conversion.offset
    }

    #[test]
    fn converts_within_a_dimension() {
        assert!((convert(212.0, "degF", "degC") - 100.0).abs() < 1e-9);
        assert!((convert(0.0, "degC", "K") - 273.15).abs() < 1e-9);
        assert!((convert(1.0, "bar", "kPa") - 100.0).abs() < 1e-9);
        assert!((convert(36.0, "km/h", "m/s") - 10.0).abs() < 1e-9);
        assert!((convert(1.0, "kWh", "Wh") - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn refuses_across_dimensions_and_unknown_units() {
        assert!(conversion("degC", "bar").is_err());
        assert!(conversion("furlong", "m").is_err());
    }
}
