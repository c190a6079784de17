//! Syntax tree → checked plan: resolves columns and functions, places aggregates and the
//! window, and refuses (with the position) everything the runtime does not support.

use std::borrow::Cow;

use super::aggregate::AggregateFunction;
use super::expr::{Expr, Function};
use super::parse::{self, ExprKind, Query, Select, Span, SqlError};
use super::value::Value;

/// Longest window, timeout or session accepted: 31 days in ms.
pub const MAX_WINDOW_MS: i64 = 31 * 24 * 3600 * 1000;
/// Most windows one event may fall in (hopping `size / hop`).
pub const MAX_OVERLAP: i64 = 1000;
/// Largest `COUNTWINDOW` size.
pub const MAX_COUNT_WINDOW: usize = 100_000;

/// A checked query.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The stream named in `FROM`, and where.
    pub from: (String, Span),
    /// `WHERE`, per event.
    pub filter: Option<Expr>,
    /// What comes out.
    pub output: Output,
    /// Some expression reads the payload (parse it per event).
    pub needs_payload: bool,
}

/// What a query emits.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// `SELECT *` without a window: the event itself, when it passes `WHERE`.
    PassThrough,
    /// Named columns without a window: one event per input event.
    Project(Vec<(String, Expr)>),
    /// A window: one event per group when a window closes.
    Window(WindowPlan),
}

/// The windowed part of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPlan {
    /// The window.
    pub window: Window,
    /// Group keys, evaluated per event.
    pub keys: Vec<Expr>,
    /// Which key is `device` (the output's device), if any.
    pub device_key: Option<usize>,
    /// Aggregates and their argument (per event; `None` for `count(*)`).
    pub aggregates: Vec<(AggregateFunction, Option<Expr>)>,
    /// Output columns, evaluated over keys and aggregate results.
    pub columns: Vec<(String, Expr)>,
    /// `HAVING`, over keys and aggregate results.
    pub having: Option<Expr>,
}

/// A window, lengths in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `TUMBLINGWINDOW(unit, n)`.
    Tumbling {
        /// Length.
        size: i64,
    },
    /// `HOPPINGWINDOW(unit, size, hop)`.
    Hopping {
        /// Length.
        size: i64,
        /// Distance between starts.
        hop: i64,
    },
    /// `SLIDINGWINDOW(unit, n)`: per event, over the trailing `size`.
    Sliding {
        /// Length.
        size: i64,
    },
    /// `SESSIONWINDOW(unit, timeout, max)`.
    Session {
        /// Gap that ends a session.
        timeout: i64,
        /// Longest session.
        max: i64,
    },
    /// `COUNTWINDOW(n[, hop])`.
    Count {
        /// Rows per window.
        size: usize,
        /// Rows between emissions.
        hop: usize,
    },
}

impl Window {
    /// The shortest time span the window reacts to, for the tick interval; `None` for
    /// count windows.
    pub fn shortest_ms(&self) -> Option<i64> {
        match *self {
            Window::Tumbling { size } | Window::Sliding { size } => Some(size),
            Window::Hopping { hop, .. } => Some(hop),
            Window::Session { timeout, .. } => Some(timeout),
            Window::Count { .. } => None,
        }
    }
}

/// Where an expression is evaluated.
#[derive(Clone, Copy)]
enum Mode<'k> {
    /// Per event: `what` names the place in errors.
    Row(&'static str),
    /// When a window emits, over these group keys.
    Emit(&'k [Expr]),
}

struct Planner<'s> {
    sql: &'s str,
    aggregates: Vec<(AggregateFunction, Option<Expr>)>,
}

/// Checks `query` (parsed from `sql`) and plans it.
pub fn plan(sql: &str, query: &Query) -> Result<Plan, SqlError> {
    let mut planner = Planner {
        sql,
        aggregates: Vec::new(),
    };
    let filter = query
        .filter
        .as_ref()
        .map(|filter| planner.compile(filter, Mode::Row("WHERE")))
        .transpose()?;
    let mut window = None;
    let mut keys = Vec::new();
    for expr in &query.group_by {
        if let ExprKind::Call { name, args, .. } = &expr.kind {
            if name.ends_with("window") {
                if window.is_some() {
                    return Err(SqlError::new(expr.span.start, "GROUP BY takes one window"));
                }
                window = Some(parse_window(name, args, &expr.span)?);
                continue;
            }
        }
        if !matches!(expr.kind, ExprKind::Column { .. }) {
            return Err(SqlError::new(
                expr.span.start,
                "GROUP BY takes columns (device, kind, payload fields) and one window function",
            ));
        }
        keys.push(planner.compile(expr, Mode::Row("GROUP BY"))?);
    }
    if window.is_none() {
        if let Some(first) = query.group_by.first() {
            return Err(SqlError::new(
                first.span.start,
                "GROUP BY needs a window: TUMBLINGWINDOW, HOPPINGWINDOW, SLIDINGWINDOW, \
                 SESSIONWINDOW or COUNTWINDOW",
            ));
        }
        if let Some(having) = &query.having {
            return Err(SqlError::new(
                having.span.start,
                "HAVING needs a window in GROUP BY",
            ));
        }
    }
    let output = match (&query.select, window) {
        (Select::Star(span), Some(_)) => {
            return Err(SqlError::new(
                span.start,
                "`*` cannot be used with a window: name the columns and aggregates",
            ));
        }
        (Select::Star(_), None) => Output::PassThrough,
        (Select::Items(items), None) => {
            let mut columns = Vec::new();
            for item in items {
                let expr = planner.compile(&item.expr, Mode::Row("a query without a window"))?;
                planner.push_column(&mut columns, item, expr)?;
            }
            Output::Project(columns)
        }
        (Select::Items(items), Some(window)) => {
            let mut columns = Vec::new();
            for item in items {
                let expr = planner.compile(&item.expr, Mode::Emit(&keys))?;
                planner.push_column(&mut columns, item, expr)?;
            }
            let having = query
                .having
                .as_ref()
                .map(|having| planner.compile(having, Mode::Emit(&keys)))
                .transpose()?;
            let device_key = keys.iter().position(|key| *key == Expr::Device);
            Output::Window(WindowPlan {
                window,
                keys,
                device_key,
                aggregates: std::mem::take(&mut planner.aggregates),
                columns,
                having,
            })
        }
    };
    let mut needs_payload = filter.as_ref().is_some_and(uses_payload);
    match &output {
        Output::PassThrough => {}
        Output::Project(columns) => {
            needs_payload |= columns.iter().any(|(_, expr)| uses_payload(expr));
        }
        Output::Window(plan) => {
            needs_payload |= plan.keys.iter().any(uses_payload)
                || plan
                    .aggregates
                    .iter()
                    .any(|(_, arg)| arg.as_ref().is_some_and(uses_payload));
        }
    }
    Ok(Plan {
        from: query.from.clone(),
        filter,
        output,
        needs_payload,
    })
}

impl Planner<'_> {
    fn push_column(
        &self,
        columns: &mut Vec<(String, Expr)>,
        item: &parse::SelectItem,
        expr: Expr,
    ) -> Result<(), SqlError> {
        let name = match (&item.alias, &item.expr.kind) {
            (Some(alias), _) => alias.clone(),
            (None, ExprKind::Column { path, .. }) => path.last().cloned().unwrap_or_default(),
            (None, ExprKind::Call { name, .. }) => name.clone(),
            (None, _) => self.sql[item.expr.span.clone()].to_owned(),
        };
        if columns.iter().any(|(existing, _)| *existing == name) {
            return Err(SqlError::new(
                item.expr.span.start,
                format!("two columns are named {name:?}: give one a name with AS"),
            ));
        }
        columns.push((name, expr));
        Ok(())
    }

    fn compile(&mut self, expr: &parse::Expr, mode: Mode<'_>) -> Result<Expr, SqlError> {
        let at = expr.span.start;
        Ok(match &expr.kind {
            ExprKind::Number(number) => Expr::Const(Value::Num(*number)),
            ExprKind::String(text) => Expr::Const(Value::Str(Cow::Owned(text.clone()))),
            ExprKind::Bool(flag) => Expr::Const(Value::Bool(*flag)),
            ExprKind::Null => Expr::Const(Value::Null),
            ExprKind::Column { path, quoted } => {
                let column = column(path, *quoted);
                match mode {
                    Mode::Row(_) => column,
                    Mode::Emit(keys) => match keys.iter().position(|key| *key == column) {
                        Some(index) => Expr::Key(index),
                        None => {
                            return Err(SqlError::new(
                                at,
                                format!(
                                    "`{}` must be in GROUP BY or inside an aggregate",
                                    &self.sql[expr.span.clone()]
                                ),
                            ));
                        }
                    },
                }
            }
            ExprKind::Unary(op, inner) => Expr::Unary(*op, Box::new(self.compile(inner, mode)?)),
            ExprKind::Binary(op, left, right) => Expr::Binary(
                *op,
                Box::new(self.compile(left, mode)?),
                Box::new(self.compile(right, mode)?),
            ),
            ExprKind::IsNull { expr, negated } => {
                Expr::IsNull(Box::new(self.compile(expr, mode)?), *negated)
            }
            ExprKind::Case {
                operand,
                branches,
                otherwise,
            } => Expr::Case {
                operand: operand
                    .as_ref()
                    .map(|operand| self.compile(operand, mode).map(Box::new))
                    .transpose()?,
                branches: branches
                    .iter()
                    .map(|(when, then)| Ok((self.compile(when, mode)?, self.compile(then, mode)?)))
                    .collect::<Result<_, SqlError>>()?,
                otherwise: otherwise
                    .as_ref()
                    .map(|otherwise| self.compile(otherwise, mode).map(Box::new))
                    .transpose()?,
            },
            ExprKind::Call { name, args, star } => {
                self.call(name, args, *star, &expr.span, mode)?
            }
        })
    }

    fn call(
        &mut self,
        name: &str,
        args: &[parse::Expr],
        star: bool,
        span: &Span,
        mode: Mode<'_>,
    ) -> Result<Expr, SqlError> {
        let at = span.start;
        let arity = |min: usize, max: usize| {
            if star || args.len() < min || args.len() > max {
                let wanted = if min == max {
                    format!("{min}")
                } else {
                    format!("{min} to {max}")
                };
                Err(SqlError::new(
                    at,
                    format!("`{name}` takes {wanted} argument(s)"),
                ))
            } else {
                Ok(())
            }
        };
        if let Some((function, min, max)) = Function::lookup(name) {
            arity(min, max)?;
            let args = args
                .iter()
                .map(|arg| self.compile(arg, mode))
                .collect::<Result<_, _>>()?;
            return Ok(Expr::Call(function, args));
        }
        match name {
            "now" => {
                arity(0, 0)?;
                return Ok(Expr::Now);
            }
            "window_start" | "window_end" => {
                arity(0, 0)?;
                if let Mode::Row(_) = mode {
                    return Err(SqlError::new(
                        at,
                        format!("`{name}()` needs a window in GROUP BY"),
                    ));
                }
                return Ok(if name == "window_start" {
                    Expr::WindowStart
                } else {
                    Expr::WindowEnd
                });
            }
            _ => {}
        }
        if let Some(mut function) = AggregateFunction::lookup(name) {
            if let Mode::Row(place) = mode {
                let hint = match place {
                    "WHERE" => " (filter on aggregates with HAVING)",
                    "a query without a window" => {
                        ": add a window to GROUP BY, e.g. TUMBLINGWINDOW(ss, 10)"
                    }
                    _ => "",
                };
                return Err(SqlError::new(
                    at,
                    format!("aggregate `{name}` is not allowed in {place}{hint}"),
                ));
            }
            let arg = if star {
                if function != AggregateFunction::Count || !args.is_empty() {
                    return Err(SqlError::new(at, format!("`{name}(*)` is not supported")));
                }
                function = AggregateFunction::CountAll;
                None
            } else {
                if let AggregateFunction::Percentile(_) = function {
                    arity(2, 2)?;
                    let p = match args[1].kind {
                        ExprKind::Number(p) if (0.0..=1.0).contains(&p) => p,
                        _ => {
                            return Err(SqlError::new(
                                args[1].span.start,
                                "percentile's second argument must be a number from 0 to 1",
                            ));
                        }
                    };
                    function = AggregateFunction::Percentile(p);
                } else {
                    arity(1, 1)?;
                }
                Some(self.compile(&args[0], Mode::Row("an aggregate's argument"))?)
            };
            self.aggregates.push((function, arg));
            return Ok(Expr::Aggregate(self.aggregates.len() - 1));
        }
        if name.ends_with("window") {
            return Err(SqlError::new(
                at,
                format!("`{name}` belongs in GROUP BY (or is not a window fieldgate knows)"),
            ));
        }
        Err(SqlError::new(
            at,
            format!("unknown function `{name}` (docs/RULES.md lists the functions)"),
        ))
    }
}

/// A column reference: `device` and `kind` are the event's; anything else (and every
/// double-quoted name) is a payload field.
fn column(path: &[String], quoted: bool) -> Expr {
    if !quoted && path.len() == 1 {
        if path[0].eq_ignore_ascii_case("device") {
            return Expr::Device;
        }
        if path[0].eq_ignore_ascii_case("kind") {
            return Expr::Kind;
        }
    }
    Expr::Field(path.to_vec())
}

fn uses_payload(expr: &Expr) -> bool {
    match expr {
        Expr::Field(_) => true,
        Expr::Unary(_, inner) | Expr::IsNull(inner, _) => uses_payload(inner),
        Expr::Binary(_, left, right) => uses_payload(left) || uses_payload(right),
        Expr::Case {
            operand,
            branches,
            otherwise,
        } => {
            operand.as_deref().is_some_and(uses_payload)
                || branches
                    .iter()
                    .any(|(when, then)| uses_payload(when) || uses_payload(then))
                || otherwise.as_deref().is_some_and(uses_payload)
        }
        Expr::Call(_, args) => args.iter().any(uses_payload),
        _ => false,
    }
}

fn parse_window(name: &str, args: &[parse::Expr], span: &Span) -> Result<Window, SqlError> {
    let at = span.start;
    let wrong = |usage: &str| SqlError::new(at, format!("usage: {usage}"));
    let integer = |arg: &parse::Expr| match arg.kind {
        ExprKind::Number(number) if number.fract() == 0.0 && (1.0..=1e12).contains(&number) => {
            // Integral and in range: exact.
            #[allow(clippy::cast_possible_truncation, reason = "checked range above")]
            Ok(number as i64)
        }
        _ => Err(SqlError::new(
            arg.span.start,
            "expected a whole number of at least 1",
        )),
    };
    let unit = |arg: &parse::Expr| match &arg.kind {
        ExprKind::Column {
            path,
            quoted: false,
        } if path.len() == 1 => match path[0].to_ascii_lowercase().as_str() {
            "ms" => Ok(1),
            "ss" => Ok(1000),
            "mi" => Ok(60_000),
            "hh" => Ok(3_600_000),
            _ => Err(SqlError::new(
                arg.span.start,
                "unknown time unit: use ms, ss, mi or hh",
            )),
        },
        _ => Err(SqlError::new(
            arg.span.start,
            "expected a time unit: ms, ss, mi or hh",
        )),
    };
    let length = |unit: i64, arg: &parse::Expr| {
        let length = integer(arg)?.saturating_mul(unit);
        if length > MAX_WINDOW_MS {
            return Err(SqlError::new(arg.span.start, "longer than 31 days"));
        }
        Ok(length)
    };
    let window = match name {
        "tumblingwindow" => {
            let [u, n] = args else {
                return Err(wrong("TUMBLINGWINDOW(unit, length)"));
            };
            Window::Tumbling {
                size: length(unit(u)?, n)?,
            }
        }
        "hoppingwindow" => {
            let [u, s, h] = args else {
                return Err(wrong("HOPPINGWINDOW(unit, size, hop)"));
            };
            let unit = unit(u)?;
            let (size, hop) = (length(unit, s)?, length(unit, h)?);
            if hop > size {
                return Err(SqlError::new(
                    h.span.start,
                    "the hop must not exceed the size",
                ));
            }
            if size / hop > MAX_OVERLAP {
                return Err(SqlError::new(
                    h.span.start,
                    format!("size / hop must be at most {MAX_OVERLAP}"),
                ));
            }
            Window::Hopping { size, hop }
        }
        "slidingwindow" => {
            let [u, n] = args else {
                return Err(wrong("SLIDINGWINDOW(unit, length)"));
            };
            Window::Sliding {
                size: length(unit(u)?, n)?,
            }
        }
        "sessionwindow" => {
            let [u, t, m] = args else {
                return Err(wrong("SESSIONWINDOW(unit, timeout, max)"));
            };
            let unit = unit(u)?;
            let (timeout, max) = (length(unit, t)?, length(unit, m)?);
            if max < timeout {
                return Err(SqlError::new(
                    m.span.start,
                    "the maximum must be at least the timeout",
                ));
            }
            Window::Session { timeout, max }
        }
        "countwindow" => {
            let (size, hop) = match args {
                [n] => (integer(n)?, integer(n)?),
                [n, h] => (integer(n)?, integer(h)?),
                _ => return Err(wrong("COUNTWINDOW(size[, hop])")),
            };
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            let hop = usize::try_from(hop).unwrap_or(usize::MAX);
            if size > MAX_COUNT_WINDOW {
                return Err(SqlError::new(
                    at,
                    format!("COUNTWINDOW size must be at most {MAX_COUNT_WINDOW}"),
                ));
            }
            if hop > size {
                return Err(SqlError::new(at, "the hop must not exceed the size"));
            }
            Window::Count { size, hop }
        }
        _ => {
            return Err(SqlError::new(
                at,
                format!(
                    "unknown window `{name}`: TUMBLINGWINDOW, HOPPINGWINDOW, SLIDINGWINDOW, \
                     SESSIONWINDOW or COUNTWINDOW"
                ),
            ));
        }
    };
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(sql: &str) -> Result<Plan, (usize, usize, String)> {
        parse::parse(sql)
            .and_then(|query| plan(sql, &query))
            .map_err(|err| {
                let (line, column) = err.position(sql);
                (line, column, err.message)
            })
    }

    fn refused(sql: &str) -> (usize, String) {
        let (_, column, message) = planned(sql).expect_err("refused");
        (column, message)
    }

    #[test]
    fn plans_the_issue_example() {
        let plan = planned(
            "SELECT device, avg(temp) AS avg_temp, max(temp) AS max_temp, count(*) AS n \
             FROM devices WHERE kind = 'telemetry' GROUP BY device, TUMBLINGWINDOW(ss, 2)",
        )
        .expect("plans");
        let Output::Window(window) = plan.output else {
            panic!("a window")
        };
        assert_eq!(window.window, Window::Tumbling { size: 2000 });
        assert_eq!(window.keys, vec![Expr::Device]);
        assert_eq!(window.device_key, Some(0));
        let names: Vec<&str> = window
            .columns
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(names, ["device", "avg_temp", "max_temp", "n"]);
        assert_eq!(window.aggregates.len(), 3);
        assert!(plan.needs_payload);
    }

    #[test]
    fn every_window_form() {
        let window = |group: &str| {
            let plan = planned(&format!("SELECT count(*) FROM d GROUP BY {group}")).expect("plans");
            match plan.output {
                Output::Window(window) => window.window,
                _ => panic!("a window"),
            }
        };
        assert_eq!(
            window("HOPPINGWINDOW(mi, 10, 5)"),
            Window::Hopping {
                size: 600_000,
                hop: 300_000
            }
        );
        assert_eq!(
            window("SLIDINGWINDOW(ms, 500)"),
            Window::Sliding { size: 500 }
        );
        assert_eq!(
            window("SESSIONWINDOW(hh, 1, 2)"),
            Window::Session {
                timeout: 3_600_000,
                max: 7_200_000
            }
        );
        assert_eq!(window("COUNTWINDOW(5)"), Window::Count { size: 5, hop: 5 });
        assert_eq!(
            window("COUNTWINDOW(5, 2)"),
            Window::Count { size: 5, hop: 2 }
        );
    }

    #[test]
    fn stateless_forms() {
        let plan = planned("SELECT * FROM d WHERE temp > 3").expect("plans");
        assert_eq!(plan.output, Output::PassThrough);
        assert!(plan.needs_payload);
        let plan = planned("SELECT * FROM d WHERE device = 'a'").expect("plans");
        assert!(!plan.needs_payload);
        let plan = planned("SELECT upper(device) AS who, temp * 1.8 + 32 FROM d").expect("plans");
        let Output::Project(columns) = plan.output else {
            panic!("projection")
        };
        assert_eq!(columns[0].0, "who");
        assert_eq!(columns[1].0, "temp * 1.8 + 32");
    }

    #[test]
    fn refusals_name_the_place() {
        let cases: &[(&str, usize, &str)] = &[
            ("SELECT avg(temp) FROM d", 8, "add a window"),
            ("SELECT a FROM d WHERE max(a) > 1", 23, "HAVING"),
            ("SELECT a FROM d GROUP BY a", 26, "needs a window"),
            (
                "SELECT * FROM d GROUP BY TUMBLINGWINDOW(ss, 1)",
                8,
                "`*` cannot",
            ),
            (
                "SELECT temp FROM d GROUP BY TUMBLINGWINDOW(ss, 1)",
                8,
                "must be in GROUP BY",
            ),
            ("SELECT foo(a) FROM d", 8, "unknown function `foo`"),
            (
                "SELECT count(*) FROM d GROUP BY TUMBLINGWINDOW(yy, 1)",
                48,
                "unknown time unit",
            ),
            (
                "SELECT count(*) FROM d GROUP BY TUMBLINGWINDOW(ss, 0)",
                52,
                "at least 1",
            ),
            (
                "SELECT count(*) FROM d GROUP BY TUMBLINGWINDOW(ss, 1.5)",
                52,
                "whole number",
            ),
            (
                "SELECT count(*) FROM d GROUP BY TUMBLINGWINDOW(ss)",
                33,
                "usage",
            ),
            (
                "SELECT count(*) FROM d GROUP BY HOPPINGWINDOW(ss, 1, 2)",
                54,
                "hop",
            ),
            (
                "SELECT count(*) FROM d GROUP BY HOPPINGWINDOW(ms, 5000, 1)",
                57,
                "size / hop",
            ),
            (
                "SELECT count(*) FROM d GROUP BY SESSIONWINDOW(ss, 5, 2)",
                54,
                "maximum",
            ),
            (
                "SELECT count(*) FROM d GROUP BY COUNTWINDOW(1000000)",
                33,
                "at most",
            ),
            (
                "SELECT count(*) FROM d GROUP BY TUMBLINGWINDOW(hh, 1000)",
                52,
                "31 days",
            ),
            (
                "SELECT count(*) FROM d GROUP BY FOOWINDOW(ss, 1)",
                33,
                "unknown window",
            ),
            (
                "SELECT count(*) FROM d GROUP BY TUMBLINGWINDOW(ss, 1), COUNTWINDOW(2)",
                56,
                "one window",
            ),
            (
                "SELECT count(*) FROM d GROUP BY lower(a), COUNTWINDOW(2)",
                33,
                "takes columns",
            ),
            ("SELECT a FROM d HAVING a > 1", 24, "HAVING needs"),
            ("SELECT window_start() FROM d", 8, "needs a window"),
            (
                "SELECT percentile(a, 50) FROM d GROUP BY COUNTWINDOW(2)",
                22,
                "from 0 to 1",
            ),
            (
                "SELECT sum(*) FROM d GROUP BY COUNTWINDOW(2)",
                8,
                "not supported",
            ),
            (
                "SELECT avg(max(a)) FROM d GROUP BY COUNTWINDOW(2)",
                12,
                "not allowed",
            ),
            ("SELECT lower(a, b) FROM d", 8, "takes 1 argument"),
            ("SELECT a, b AS a FROM d", 11, "two columns"),
            (
                "SELECT a FROM d WHERE TUMBLINGWINDOW(ss, 1)",
                23,
                "belongs in GROUP BY",
            ),
        ];
        for (sql, column, needle) in cases {
            let (found_column, message) = refused(sql);
            assert!(message.contains(needle), "{sql}: {message}");
            assert_eq!(found_column, *column, "{sql}: {message}");
        }
    }
}
