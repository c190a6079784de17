//! Checked expressions and their evaluation: operators with SQL's null rules, and the
//! scalar functions. Evaluation borrows from the event and allocates only for results
//! that are new strings or JSON.

use std::borrow::Cow;

use fieldgate_core::Event;
use serde_json::Value as Json;

use super::parse::{BinaryOp, UnaryOp};
use super::value::{OwnedValue, Value};
use crate::transforms::payload;

/// A scalar function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `lower(s)`.
    Lower,
    /// `upper(s)`.
    Upper,
    /// `concat(a, …)`: the non-null arguments as text, joined.
    Concat,
    /// `length(s)`, in characters.
    Length,
    /// `substring(s, start[, length])`, 1-based, in characters.
    Substring,
    /// `trim(s)`.
    Trim,
    /// `abs(x)`.
    Abs,
    /// `round(x[, digits])`.
    Round,
    /// `floor(x)`.
    Floor,
    /// `ceil(x)`.
    Ceil,
    /// `sqrt(x)`.
    Sqrt,
    /// `power(x, y)`.
    Power,
    /// `ln(x)`.
    Ln,
    /// `log10(x)`.
    Log10,
}

impl Function {
    /// The function called `name` (lower case) and its arity range.
    pub fn lookup(name: &str) -> Option<(Function, usize, usize)> {
        Some(match name {
            "lower" => (Function::Lower, 1, 1),
            "upper" => (Function::Upper, 1, 1),
            "concat" => (Function::Concat, 1, 64),
            "length" => (Function::Length, 1, 1),
            "substring" => (Function::Substring, 2, 3),
            "trim" => (Function::Trim, 1, 1),
            "abs" => (Function::Abs, 1, 1),
            "round" => (Function::Round, 1, 2),
            "floor" => (Function::Floor, 1, 1),
            "ceil" => (Function::Ceil, 1, 1),
            "sqrt" => (Function::Sqrt, 1, 1),
            "power" => (Function::Power, 2, 2),
            "ln" => (Function::Ln, 1, 1),
            "log10" => (Function::Log10, 1, 1),
            _ => return None,
        })
    }
}

/// A checked expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal.
    Const(OwnedValue),
    /// The event's device id.
    Device,
    /// The event's kind.
    Kind,
    /// A payload field by dotted path.
    Field(Vec<String>),
    /// Group key `i` (when a window emits).
    Key(usize),
    /// Aggregate result `i` (when a window emits).
    Aggregate(usize),
    /// `window_start()`, epoch ms.
    WindowStart,
    /// `window_end()`, epoch ms.
    WindowEnd,
    /// `now()`, epoch ms.
    Now,
    /// A unary operation.
    Unary(UnaryOp, Box<Expr>),
    /// A binary operation.
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `IS [NOT] NULL` (`true`: `IS NOT NULL`).
    IsNull(Box<Expr>, bool),
    /// `CASE`.
    Case {
        /// The simple form's operand.
        operand: Option<Box<Expr>>,
        /// `WHEN` → `THEN`.
        branches: Vec<(Expr, Expr)>,
        /// `ELSE`.
        otherwise: Option<Box<Expr>>,
    },
    /// A scalar function call.
    Call(Function, Vec<Expr>),
}

/// What an expression can see.
pub struct Scope<'a> {
    /// The event (per-event expressions).
    pub event: Option<&'a Event>,
    /// Its parsed payload.
    pub payload: Option<&'a Json>,
    /// Group keys (window outputs).
    pub keys: &'a [OwnedValue],
    /// Aggregate results (window outputs).
    pub aggregates: &'a [OwnedValue],
    /// The window's bounds in epoch ms.
    pub window: (i64, i64),
    /// `now()` in epoch ms.
    pub now_ms: i64,
}

/// Reborrows a stored value for the scope's lifetime.
fn borrow(value: &OwnedValue) -> Value<'_> {
    match value {
        Value::Null => Value::Null,
        Value::Bool(flag) => Value::Bool(*flag),
        Value::Num(number) => Value::Num(*number),
        Value::Str(text) => Value::Str(Cow::Borrowed(text)),
        Value::Json(json) => Value::Json(Cow::Borrowed(json)),
    }
}

/// A number, or null when not finite.
fn num(number: f64) -> Value<'static> {
    if number.is_finite() {
        Value::Num(number)
    } else {
        Value::Null
    }
}

impl Expr {
    /// Evaluates the expression in `scope`.
    pub fn eval<'a>(&'a self, scope: &Scope<'a>) -> Value<'a> {
        match self {
            Expr::Const(value) => borrow(value),
            Expr::Device => scope.event.map_or(Value::Null, |event| {
                Value::Str(Cow::Borrowed(event.device.as_str()))
            }),
            Expr::Kind => scope.event.map_or(Value::Null, |event| {
                Value::Str(Cow::Borrowed(event.kind.as_str()))
            }),
            Expr::Field(path) => scope
                .payload
                .and_then(|json| payload::get(json, path))
                .map_or(Value::Null, Value::from_json),
            Expr::Key(index) => scope.keys.get(*index).map_or(Value::Null, borrow),
            Expr::Aggregate(index) => scope.aggregates.get(*index).map_or(Value::Null, borrow),
            #[allow(clippy::cast_precision_loss, reason = "epoch ms fit f64 exactly")]
            Expr::WindowStart => Value::Num(scope.window.0 as f64),
            #[allow(clippy::cast_precision_loss, reason = "epoch ms fit f64 exactly")]
            Expr::WindowEnd => Value::Num(scope.window.1 as f64),
            #[allow(clippy::cast_precision_loss, reason = "epoch ms fit f64 exactly")]
            Expr::Now => Value::Num(scope.now_ms as f64),
            Expr::Unary(op, inner) => match (op, inner.eval(scope)) {
                (UnaryOp::Neg, Value::Num(number)) => Value::Num(-number),
                (UnaryOp::Not, Value::Bool(flag)) => Value::Bool(!flag),
                _ => Value::Null,
            },
            Expr::Binary(op, left, right) => binary(*op, left, right, scope),
            Expr::IsNull(inner, negated) => {
                Value::Bool(matches!(inner.eval(scope), Value::Null) != *negated)
            }
            Expr::Case {
                operand,
                branches,
                otherwise,
            } => {
                let operand = operand.as_ref().map(|operand| operand.eval(scope));
                for (when, then) in branches {
                    let hit = match &operand {
                        Some(operand) => equal(operand, &when.eval(scope)).is_true(),
                        None => when.eval(scope).is_true(),
                    };
                    if hit {
                        return then.eval(scope);
                    }
                }
                otherwise
                    .as_ref()
                    .map_or(Value::Null, |otherwise| otherwise.eval(scope))
            }
            Expr::Call(function, args) => call(*function, args, scope),
        }
    }
}

fn equal(left: &Value<'_>, right: &Value<'_>) -> Value<'static> {
    match (left, right) {
        (Value::Null, _) | (_, Value::Null) => Value::Null,
        (Value::Num(a), Value::Num(b)) => Value::Bool(a == b),
        _ => Value::Bool(left == right),
    }
}

fn binary<'a>(op: BinaryOp, left: &'a Expr, right: &'a Expr, scope: &Scope<'a>) -> Value<'a> {
    match op {
        BinaryOp::And => {
            let left = left.eval(scope);
            if matches!(left, Value::Bool(false)) {
                return Value::Bool(false);
            }
            match (left, right.eval(scope)) {
                (_, Value::Bool(false)) => Value::Bool(false),
                (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                _ => Value::Null,
            }
        }
        BinaryOp::Or => {
            let left = left.eval(scope);
            if matches!(left, Value::Bool(true)) {
                return Value::Bool(true);
            }
            match (left, right.eval(scope)) {
                (_, Value::Bool(true)) => Value::Bool(true),
                (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                _ => Value::Null,
            }
        }
        _ => {
            let left = left.eval(scope);
            let right = right.eval(scope);
            match op {
                BinaryOp::Eq => equal(&left, &right),
                BinaryOp::Ne => match equal(&left, &right) {
                    Value::Bool(flag) => Value::Bool(!flag),
                    other => other,
                },
                BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                    let ordering = match (&left, &right) {
                        (Value::Num(a), Value::Num(b)) => a.partial_cmp(b),
                        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
                        _ => None,
                    };
                    ordering.map_or(Value::Null, |ordering| {
                        Value::Bool(match op {
                            BinaryOp::Lt => ordering.is_lt(),
                            BinaryOp::Le => ordering.is_le(),
                            BinaryOp::Gt => ordering.is_gt(),
                            _ => ordering.is_ge(),
                        })
                    })
                }
                BinaryOp::Concat => match (left.to_text(), right.to_text()) {
                    (Some(a), Some(b)) => Value::Str(Cow::Owned(format!("{a}{b}"))),
                    _ => Value::Null,
                },
                _ => match (left.as_num(), right.as_num()) {
                    (Some(a), Some(b)) => match op {
                        BinaryOp::Add => num(a + b),
                        BinaryOp::Sub => num(a - b),
                        BinaryOp::Mul => num(a * b),
                        BinaryOp::Div if b != 0.0 => num(a / b),
                        BinaryOp::Rem if b != 0.0 => num(a % b),
                        _ => Value::Null,
                    },
                    _ => Value::Null,
                },
            }
        }
    }
}

fn call<'a>(function: Function, args: &'a [Expr], scope: &Scope<'a>) -> Value<'a> {
    let arg = |index: usize| args.get(index).map_or(Value::Null, |arg| arg.eval(scope));
    let number = |index: usize| arg(index).as_num();
    let text = |index: usize| match arg(index) {
        Value::Str(text) => Some(text),
        _ => None,
    };
    let math = |apply: fn(f64) -> f64| number(0).map_or(Value::Null, |x| num(apply(x)));
    match function {
        Function::Lower => {
            text(0).map_or(Value::Null, |s| Value::Str(Cow::Owned(s.to_lowercase())))
        }
        Function::Upper => {
            text(0).map_or(Value::Null, |s| Value::Str(Cow::Owned(s.to_uppercase())))
        }
        Function::Concat => {
            let mut joined = String::new();
            for value in args.iter().map(|arg| arg.eval(scope)) {
                if let Some(part) = value.to_text() {
                    joined.push_str(&part);
                }
            }
            Value::Str(Cow::Owned(joined))
        }
        #[allow(clippy::cast_precision_loss, reason = "string lengths fit f64 exactly")]
        Function::Length => text(0).map_or(Value::Null, |s| Value::Num(s.chars().count() as f64)),
        Function::Substring => {
            let (Some(s), Some(start)) = (text(0), number(1)) else {
                return Value::Null;
            };
            let length = if args.len() > 2 {
                match number(2) {
                    Some(length) if length >= 0.0 => Some(length),
                    _ => return Value::Null,
                }
            } else {
                None
            };
            // SQL's 1-based start; a start before 1 eats into the length, as in SQL.
            let start = start.floor();
            let skip = (start - 1.0).max(0.0);
            let take = length.map(|length| (length + start.min(1.0) - 1.0).max(0.0));
            let skip = to_count(skip);
            let chars = s.chars().skip(skip);
            let picked: String = match take {
                Some(take) => chars.take(to_count(take)).collect(),
                None => chars.collect(),
            };
            Value::Str(Cow::Owned(picked))
        }
        Function::Trim => match arg(0) {
            Value::Str(Cow::Borrowed(s)) => Value::Str(Cow::Borrowed(s.trim())),
            Value::Str(Cow::Owned(s)) => Value::Str(Cow::Owned(s.trim().to_owned())),
            _ => Value::Null,
        },
        Function::Abs => math(f64::abs),
        Function::Floor => math(f64::floor),
        Function::Ceil => math(f64::ceil),
        Function::Sqrt => math(f64::sqrt),
        Function::Ln => math(f64::ln),
        Function::Log10 => math(f64::log10),
        Function::Power => match (number(0), number(1)) {
            (Some(x), Some(y)) => num(x.powf(y)),
            _ => Value::Null,
        },
        Function::Round => {
            let Some(x) = number(0) else {
                return Value::Null;
            };
            let digits = if args.len() > 1 {
                match number(1) {
                    Some(digits) => digits.clamp(-15.0, 15.0).trunc(),
                    None => return Value::Null,
                }
            } else {
                0.0
            };
            let scale = 10f64.powf(digits);
            num((x * scale).round() / scale)
        }
    }
}

/// A non-negative float as a count, saturating.
fn to_count(value: f64) -> usize {
    if value <= 0.0 || value.is_nan() {
        0
    } else if value >= 1e15 {
        usize::MAX
    } else {
        // Non-negative, integral after floor and below 1e15: the conversion is exact.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked range above"
        )]
        let count = value.floor() as usize;
        count
    }
}
