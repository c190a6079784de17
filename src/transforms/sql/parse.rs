//! SQL text → syntax tree: a small hand-written lexer and recursive-descent parser for the
//! grammar in docs/RULES.md. Pure (text in, tree or positioned error out), capped in size
//! and nesting so hostile input cannot exhaust the stack.

use std::fmt;

/// Longest SQL text accepted, in bytes.
pub const MAX_SQL_LEN: usize = 64 * 1024;
/// Deepest expression nesting accepted (parentheses, operators, calls).
pub const MAX_DEPTH: usize = 64;
/// Most binary operators in one query: bounds the depth of left-leaning operator chains
/// (`a + a + …`), which the planner and evaluator walk recursively.
pub const MAX_OPERATORS: usize = 512;

/// Words that are part of SQL but not of fieldgate's grammar: named in the error when the
/// parse fails at or just after one.
const UNSUPPORTED: &[&str] = &[
    "JOIN",
    "INNER",
    "LEFT",
    "RIGHT",
    "FULL",
    "CROSS",
    "ON",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "UNION",
    "INTERSECT",
    "EXCEPT",
    "DISTINCT",
    "LIKE",
    "IN",
    "BETWEEN",
    "EXISTS",
    "OVER",
    "PARTITION",
    "WITH",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE",
    "DROP",
    "INTO",
    "VALUES",
    "CAST",
    "INTERVAL",
    "FILTER",
];

/// Words that cannot be column names unless double-quoted.
const RESERVED: &[&str] = &[
    "SELECT", "FROM", "WHERE", "GROUP", "BY", "HAVING", "AS", "AND", "OR", "NOT", "CASE", "WHEN",
    "THEN", "ELSE", "END", "IS", "NULL", "TRUE", "FALSE",
];

/// A byte range in the SQL text.
pub type Span = std::ops::Range<usize>;

/// A syntax error: where (byte offset into the SQL text) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    /// Byte offset of the offending token.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

impl SqlError {
    /// A new error at `offset`.
    pub fn new(offset: usize, message: impl Into<String>) -> Self {
        Self {
            offset,
            message: message.into(),
        }
    }

    /// The 1-based line and column (in characters) of the error inside `sql`.
    pub fn position(&self, sql: &str) -> (usize, usize) {
        let mut offset = self.offset.min(sql.len());
        while !sql.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &sql[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |at| at + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// What to select.
    pub select: Select,
    /// The stream named after `FROM`, with its span.
    pub from: (String, Span),
    /// The `WHERE` condition.
    pub filter: Option<Expr>,
    /// The `GROUP BY` expressions (keys and the window call).
    pub group_by: Vec<Expr>,
    /// The `HAVING` condition.
    pub having: Option<Expr>,
}

/// The select list.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// `SELECT *`.
    Star(Span),
    /// `SELECT expr [AS name], …`.
    Items(Vec<SelectItem>),
}

/// One projected column.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    /// Its expression.
    pub expr: Expr,
    /// Its `AS` name.
    pub alias: Option<String>,
}

/// An expression with its span.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    /// What it is.
    pub kind: ExprKind,
    /// Where it is.
    pub span: Span,
}

/// Unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    /// `-x`.
    Neg,
    /// `NOT x`.
    Not,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
    /// `%`.
    Rem,
    /// `||`.
    Concat,
    /// `=`.
    Eq,
    /// `!=`, `<>`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `AND`.
    And,
    /// `OR`.
    Or,
}

/// The expression forms.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// A number literal.
    Number(f64),
    /// A string literal.
    String(String),
    /// `TRUE` / `FALSE`.
    Bool(bool),
    /// `NULL`.
    Null,
    /// A column: `device`, `kind`, a payload field (`temp`, `env.temp`) or a double-quoted
    /// name (always a payload field).
    Column {
        /// Dotted path segments.
        path: Vec<String>,
        /// Double-quoted: never a meta column.
        quoted: bool,
    },
    /// A function call; `star` for `count(*)`.
    Call {
        /// Lower-cased name.
        name: String,
        /// Arguments.
        args: Vec<Expr>,
        /// Written as `f(*)`.
        star: bool,
    },
    /// A unary operation.
    Unary(UnaryOp, Box<Expr>),
    /// A binary operation.
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `x IS NULL` (`negated`: `IS NOT NULL`).
    IsNull {
        /// The tested expression.
        expr: Box<Expr>,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `CASE [operand] WHEN … THEN … [ELSE …] END`.
    Case {
        /// The simple form's operand.
        operand: Option<Box<Expr>>,
        /// `WHEN` → `THEN` pairs.
        branches: Vec<(Expr, Expr)>,
        /// `ELSE`.
        otherwise: Option<Box<Expr>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    QuotedWord(String),
    Number(f64),
    String(String),
    Symbol(&'static str),
    Eof,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(word) => format!("`{word}`"),
            Token::QuotedWord(word) => format!("\"{word}\""),
            Token::Number(_) => "a number".to_owned(),
            Token::String(_) => "a string".to_owned(),
            Token::Symbol(symbol) => format!("`{symbol}`"),
            Token::Eof => "the end of the SQL".to_owned(),
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(word) if word.eq_ignore_ascii_case(keyword))
    }
}

const SYMBOLS: &[&str] = &[
    "<=", ">=", "<>", "!=", "||", "(", ")", ",", ".", "*", "+", "-", "/", "%", "=", "<", ">",
];

fn lex(sql: &str) -> Result<Vec<(Token, Span)>, SqlError> {
    let bytes = sql.as_bytes();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        let byte = bytes[at];
        if byte.is_ascii_whitespace() {
            at += 1;
            continue;
        }
        if sql[at..].starts_with("--") {
            at = sql[at..].find('\n').map_or(bytes.len(), |end| at + end);
            continue;
        }
        if byte.is_ascii_alphabetic() || byte == b'_' {
            while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
                at += 1;
            }
            tokens.push((Token::Word(sql[start..at].to_owned()), start..at));
        } else if byte.is_ascii_digit() {
            while at < bytes.len() && bytes[at].is_ascii_digit() {
                at += 1;
            }
            if at + 1 < bytes.len() && bytes[at] == b'.' && bytes[at + 1].is_ascii_digit() {
                at += 1;
                while at < bytes.len() && bytes[at].is_ascii_digit() {
                    at += 1;
                }
            }
            if at < bytes.len() && (bytes[at] == b'e' || bytes[at] == b'E') {
                let mut exp = at + 1;
                if exp < bytes.len() && (bytes[exp] == b'+' || bytes[exp] == b'-') {
                    exp += 1;
                }
                if exp < bytes.len() && bytes[exp].is_ascii_digit() {
                    at = exp;
                    while at < bytes.len() && bytes[at].is_ascii_digit() {
                        at += 1;
                    }
                }
            }
            let number: f64 = sql[start..at]
                .parse()
                .map_err(|_| SqlError::new(start, "invalid number"))?;
            if !number.is_finite() {
                return Err(SqlError::new(start, "number out of range"));
            }
            tokens.push((Token::Number(number), start..at));
        } else if byte == b'\'' || byte == b'"' {
            let (text, end) = quoted(sql, at, byte)?;
            at = end;
            let token = if byte == b'\'' {
                Token::String(text)
            } else if text.is_empty() {
                return Err(SqlError::new(start, "empty quoted name"));
            } else {
                Token::QuotedWord(text)
            };
            tokens.push((token, start..at));
        } else if let Some(symbol) = SYMBOLS
            .iter()
            .find(|symbol| sql[at..].starts_with(**symbol))
        {
            at += symbol.len();
            tokens.push((Token::Symbol(symbol), start..at));
        } else {
            let shown = sql[at..].chars().next().unwrap_or('?');
            return Err(SqlError::new(
                start,
                format!("unexpected character {shown:?}"),
            ));
        }
    }
    tokens.push((Token::Eof, bytes.len()..bytes.len()));
    Ok(tokens)
}

/// Reads a quoted string or name starting at `start`; a doubled quote is one quote.
fn quoted(sql: &str, start: usize, quote: u8) -> Result<(String, usize), SqlError> {
    let bytes = sql.as_bytes();
    let mut text = String::new();
    let mut at = start + 1;
    let mut run = at;
    loop {
        if at >= bytes.len() {
            let what = if quote == b'\'' {
                "string"
            } else {
                "quoted name"
            };
            return Err(SqlError::new(start, format!("unterminated {what}")));
        }
        if bytes[at] == quote {
            text.push_str(&sql[run..at]);
            if at + 1 < bytes.len() && bytes[at + 1] == quote {
                text.push(char::from(quote));
                at += 2;
                run = at;
                continue;
            }
            return Ok((text, at + 1));
        }
        at += 1;
    }
}

/// Parses one query.
pub fn parse(sql: &str) -> Result<Query, SqlError> {
    if sql.len() > MAX_SQL_LEN {
        return Err(SqlError::new(
            MAX_SQL_LEN,
            format!("the SQL is longer than {MAX_SQL_LEN} bytes"),
        ));
    }
    let tokens = lex(sql)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
        operators: 0,
    };
    let query = parser.query()?;
    let (token, span) = parser.peek();
    if *token != Token::Eof {
        return Err(parser.unexpected(token, span.start, "the end of the query"));
    }
    Ok(query)
}

struct Parser {
    tokens: Vec<(Token, Span)>,
    at: usize,
    depth: usize,
    operators: usize,
}

impl Parser {
    fn peek(&self) -> (&Token, Span) {
        let index = self.at.min(self.tokens.len() - 1);
        let (token, span) = &self.tokens[index];
        (token, span.clone())
    }

    fn next(&mut self) -> (Token, Span) {
        let index = self.at.min(self.tokens.len() - 1);
        self.at += 1;
        self.tokens[index].clone()
    }

    fn offset(&self) -> usize {
        self.peek().1.start
    }

    fn last_end(&self) -> usize {
        self.at
            .checked_sub(1)
            .and_then(|index| self.tokens.get(index))
            .map_or(0, |(_, span)| span.end)
    }

    /// An error at `token`; when it or the word before it is SQL that fieldgate does not
    /// support (`ORDER`, `DISTINCT`, …), the error says so. Those words stay usable as
    /// field names (`values`, `limit`), so they only show up where the parse fails.
    fn unexpected(&self, token: &Token, offset: usize, expected: &str) -> SqlError {
        let previous = self
            .at
            .checked_sub(1)
            .and_then(|index| self.tokens.get(index))
            .filter(|(_, span)| span.end <= offset);
        let candidates = [
            Some((token, offset)),
            previous.map(|(token, span)| (token, span.start)),
        ];
        for (candidate, at) in candidates.into_iter().flatten() {
            if let Token::Word(word) = candidate {
                let upper = word.to_ascii_uppercase();
                if UNSUPPORTED.contains(&upper.as_str()) {
                    return SqlError::new(
                        at,
                        format!(
                            "`{upper}` is not supported in fieldgate SQL rules (see docs/RULES.md)"
                        ),
                    );
                }
            }
        }
        SqlError::new(
            offset,
            format!("expected {expected}, found {}", token.describe()),
        )
    }

    fn keyword(&mut self, keyword: &str) -> bool {
        if self.peek().0.is_keyword(keyword) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), SqlError> {
        if self.keyword(keyword) {
            Ok(())
        } else {
            let (token, span) = self.peek();
            Err(self.unexpected(token, span.start, &format!("`{keyword}`")))
        }
    }

    fn symbol(&mut self, symbol: &str) -> bool {
        if matches!(self.peek().0, Token::Symbol(found) if *found == symbol) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_symbol(&mut self, symbol: &str) -> Result<(), SqlError> {
        if self.symbol(symbol) {
            Ok(())
        } else {
            let (token, span) = self.peek();
            Err(self.unexpected(token, span.start, &format!("`{symbol}`")))
        }
    }

    /// A name: an unreserved word or a double-quoted name.
    fn name(&mut self, what: &str) -> Result<(String, Span, bool), SqlError> {
        let (token, span) = self.peek();
        match token {
            Token::Word(word) if !is_reserved(word) => {
                let word = word.clone();
                self.at += 1;
                Ok((word, span, false))
            }
            Token::QuotedWord(word) => {
                let word = word.clone();
                self.at += 1;
                Ok((word, span, true))
            }
            _ => Err(self.unexpected(token, span.start, what)),
        }
    }

    fn query(&mut self) -> Result<Query, SqlError> {
        self.expect_keyword("SELECT")?;
        let select = if matches!(self.peek().0, Token::Symbol("*")) {
            let span = self.next().1;
            Select::Star(span)
        } else {
            let mut items = Vec::new();
            loop {
                let expr = self.expr()?;
                let alias = if self.keyword("AS") {
                    Some(self.name("a column name after `AS`")?.0)
                } else {
                    None
                };
                items.push(SelectItem { expr, alias });
                if !self.symbol(",") {
                    break;
                }
            }
            Select::Items(items)
        };
        self.expect_keyword("FROM")?;
        let (from, span, _) = self.name("a stream name (one of the transform's inputs)")?;
        let filter = if self.keyword("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.keyword("GROUP") {
            self.expect_keyword("BY")?;
            loop {
                group_by.push(self.expr()?);
                if !self.symbol(",") {
                    break;
                }
            }
        }
        let having = if self.keyword("HAVING") {
            Some(self.expr()?)
        } else {
            None
        };
        Ok(Query {
            select,
            from: (from, span),
            filter,
            group_by,
            having,
        })
    }

    fn expr(&mut self) -> Result<Expr, SqlError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(SqlError::new(
                self.offset(),
                format!("expression nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        let result = self.or();
        self.depth -= 1;
        result
    }

    fn binary(&mut self, op: BinaryOp, left: Expr, right: Expr) -> Result<Expr, SqlError> {
        self.operators += 1;
        if self.operators > MAX_OPERATORS {
            return Err(SqlError::new(
                right.span.start,
                format!("more than {MAX_OPERATORS} operators in one query"),
            ));
        }
        let span = left.span.start..right.span.end;
        Ok(Expr {
            kind: ExprKind::Binary(op, Box::new(left), Box::new(right)),
            span,
        })
    }

    fn or(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.and()?;
        while self.keyword("OR") {
            let right = self.and()?;
            left = self.binary(BinaryOp::Or, left, right)?;
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.not()?;
        while self.keyword("AND") {
            let right = self.not()?;
            left = self.binary(BinaryOp::And, left, right)?;
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, SqlError> {
        let start = self.offset();
        if self.keyword("NOT") {
            let inner = self.nested(Self::not)?;
            let span = start..inner.span.end;
            return Ok(Expr {
                kind: ExprKind::Unary(UnaryOp::Not, Box::new(inner)),
                span,
            });
        }
        self.comparison()
    }

    /// Runs `step` one nesting level deeper (for the recursive unary forms).
    fn nested(&mut self, step: fn(&mut Self) -> Result<Expr, SqlError>) -> Result<Expr, SqlError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(SqlError::new(
                self.offset(),
                format!("expression nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        let result = step(self);
        self.depth -= 1;
        result
    }

    fn comparison(&mut self) -> Result<Expr, SqlError> {
        let left = self.additive()?;
        if self.keyword("IS") {
            let negated = self.keyword("NOT");
            self.expect_keyword("NULL")?;
            let span = left.span.start..self.last_end();
            return Ok(Expr {
                kind: ExprKind::IsNull {
                    expr: Box::new(left),
                    negated,
                },
                span,
            });
        }
        let op = match self.peek().0 {
            Token::Symbol("=") => BinaryOp::Eq,
            Token::Symbol("!=" | "<>") => BinaryOp::Ne,
            Token::Symbol("<") => BinaryOp::Lt,
            Token::Symbol("<=") => BinaryOp::Le,
            Token::Symbol(">") => BinaryOp::Gt,
            Token::Symbol(">=") => BinaryOp::Ge,
            _ => return Ok(left),
        };
        self.at += 1;
        let right = self.additive()?;
        self.binary(op, left, right)
    }

    fn additive(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek().0 {
                Token::Symbol("+") => BinaryOp::Add,
                Token::Symbol("-") => BinaryOp::Sub,
                Token::Symbol("||") => BinaryOp::Concat,
                _ => return Ok(left),
            };
            self.at += 1;
            let right = self.multiplicative()?;
            left = self.binary(op, left, right)?;
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek().0 {
                Token::Symbol("*") => BinaryOp::Mul,
                Token::Symbol("/") => BinaryOp::Div,
                Token::Symbol("%") => BinaryOp::Rem,
                _ => return Ok(left),
            };
            self.at += 1;
            let right = self.unary()?;
            left = self.binary(op, left, right)?;
        }
    }

    fn unary(&mut self) -> Result<Expr, SqlError> {
        let start = self.offset();
        if self.symbol("-") {
            let inner = self.nested(Self::unary)?;
            let span = start..inner.span.end;
            if let ExprKind::Number(number) = inner.kind {
                return Ok(Expr {
                    kind: ExprKind::Number(-number),
                    span,
                });
            }
            return Ok(Expr {
                kind: ExprKind::Unary(UnaryOp::Neg, Box::new(inner)),
                span,
            });
        }
        if self.symbol("+") {
            return self.nested(Self::unary);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, SqlError> {
        let (token, span) = self.peek();
        let start = span.start;
        let literal = |kind| Expr {
            kind,
            span: span.clone(),
        };
        let expr = match token {
            Token::Number(number) => literal(ExprKind::Number(*number)),
            Token::String(text) => literal(ExprKind::String(text.clone())),
            Token::Word(word) if word.eq_ignore_ascii_case("NULL") => literal(ExprKind::Null),
            Token::Word(word) if word.eq_ignore_ascii_case("TRUE") => literal(ExprKind::Bool(true)),
            Token::Word(word) if word.eq_ignore_ascii_case("FALSE") => {
                literal(ExprKind::Bool(false))
            }
            Token::Word(word) if word.eq_ignore_ascii_case("CASE") => {
                self.at += 1;
                return self.case(start);
            }
            Token::Symbol("(") => {
                self.at += 1;
                let mut inner = self.expr()?;
                self.expect_symbol(")")?;
                inner.span = start..self.last_end();
                return Ok(inner);
            }
            Token::Word(_) | Token::QuotedWord(_) => return self.column_or_call(),
            _ => return Err(self.unexpected(token, start, "an expression")),
        };
        self.at += 1;
        Ok(expr)
    }

    fn case(&mut self, start: usize) -> Result<Expr, SqlError> {
        let operand = if self.peek().0.is_keyword("WHEN") {
            None
        } else {
            Some(Box::new(self.expr()?))
        };
        let mut branches = Vec::new();
        while self.keyword("WHEN") {
            let when = self.expr()?;
            self.expect_keyword("THEN")?;
            let then = self.expr()?;
            branches.push((when, then));
        }
        if branches.is_empty() {
            let (token, span) = self.peek();
            return Err(self.unexpected(token, span.start, "`WHEN`"));
        }
        let otherwise = if self.keyword("ELSE") {
            Some(Box::new(self.expr()?))
        } else {
            None
        };
        self.expect_keyword("END")?;
        Ok(Expr {
            kind: ExprKind::Case {
                operand,
                branches,
                otherwise,
            },
            span: start..self.last_end(),
        })
    }

    fn column_or_call(&mut self) -> Result<Expr, SqlError> {
        let (first, span, quoted) = self.name("an expression")?;
        let start = span.start;
        if !quoted && self.symbol("(") {
            let name = first.to_ascii_lowercase();
            let mut args = Vec::new();
            let mut star = false;
            if self.symbol("*") {
                star = true;
            } else if !matches!(self.peek().0, Token::Symbol(")")) {
                loop {
                    args.push(self.expr()?);
                    if !self.symbol(",") {
                        break;
                    }
                }
            }
            self.expect_symbol(")")?;
            return Ok(Expr {
                kind: ExprKind::Call { name, args, star },
                span: start..self.last_end(),
            });
        }
        let mut path = vec![first];
        while self.symbol(".") {
            let (token, span) = self.peek();
            match token {
                Token::Number(number) if number.fract() == 0.0 && *number >= 0.0 => {
                    path.push(format!("{number}"));
                    self.at += 1;
                }
                Token::Word(word) => {
                    path.push(word.clone());
                    self.at += 1;
                }
                Token::QuotedWord(word) => {
                    path.push(word.clone());
                    self.at += 1;
                }
                _ => return Err(self.unexpected(token, span.start, "a field name after `.`")),
            }
        }
        Ok(Expr {
            kind: ExprKind::Column { path, quoted },
            span: start..self.last_end(),
        })
    }
}

fn is_reserved(word: &str) -> bool {
    let upper = word.to_ascii_uppercase();
    RESERVED.contains(&upper.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(sql: &str) -> (usize, usize, String) {
        let err = parse(sql).expect_err("refused");
        let (line, column) = err.position(sql);
        (line, column, err.message)
    }

    #[test]
    fn the_issue_example_parses() {
        let query = parse(
            "SELECT device, avg(temp) AS avg_temp, max(temp) AS max_temp, count(*) AS n \
             FROM devices WHERE kind = 'telemetry' GROUP BY device, TUMBLINGWINDOW(ss, 2)",
        )
        .expect("parses");
        assert_eq!(query.from.0, "devices");
        let Select::Items(items) = &query.select else {
            panic!("items")
        };
        assert_eq!(items.len(), 4);
        assert_eq!(items[1].alias.as_deref(), Some("avg_temp"));
        assert!(
            matches!(&items[3].expr.kind, ExprKind::Call { name, star: true, .. } if name == "count")
        );
        assert_eq!(query.group_by.len(), 2);
        assert!(query.filter.is_some());
    }

    #[test]
    fn precedence_and_forms() {
        let query = parse(
            "select a + b * 2 as x, -c, not d = 1 or e is not null and f <> 'it''s', \
             case when t > 1 then 'hi' else 'lo' end, case k when 1 then 2 end, \
             env.temp, values.0, \"odd name\", lower(s) || upper(s), limit, order from s -- comment",
        )
        .expect("parses");
        let Select::Items(items) = &query.select else {
            panic!("items")
        };
        assert!(matches!(
            &items[0].expr.kind,
            ExprKind::Binary(BinaryOp::Add, _, right)
                if matches!(right.kind, ExprKind::Binary(BinaryOp::Mul, _, _))
        ));
        assert!(matches!(
            &items[2].expr.kind,
            ExprKind::Binary(BinaryOp::Or, left, _)
                if matches!(left.kind, ExprKind::Unary(UnaryOp::Not, _))
        ));
        assert!(matches!(
            &items[5].expr.kind,
            ExprKind::Column { path, quoted: false } if path == &["env", "temp"]
        ));
        assert!(matches!(
            &items[6].expr.kind,
            ExprKind::Column { path, .. } if path == &["values", "0"]
        ));
        assert!(matches!(
            &items[7].expr.kind,
            ExprKind::Column { quoted: true, .. }
        ));
    }

    #[test]
    fn errors_carry_their_position() {
        assert_eq!(
            error("SELECT temp FROM"),
            (
                1,
                17,
                "expected a stream name (one of the transform's inputs), found the end of the SQL"
                    .to_owned()
            )
        );
        assert_eq!(error("SELECT avg(temp FROM d").0, 1);
        assert_eq!(error("SELECT avg(temp FROM d").1, 17);
        let (line, column, message) = error("SELECT temp\nFROM d\nWHERE temp >> 3");
        assert_eq!((line, column), (3, 13));
        assert!(message.contains("expected an expression"), "{message}");
        assert_eq!(error("SELECT 'abc FROM d").1, 8);
        assert!(
            error("SELECT 'abc FROM d")
                .2
                .contains("unterminated string")
        );
        assert_eq!(error("SELECT a FROM d ORDER BY a").1, 17);
        assert!(
            error("SELECT a FROM d ORDER BY a")
                .2
                .contains("`ORDER` is not supported")
        );
        assert!(
            error("SELECT a FROM d WHERE a LIKE 'x%'")
                .2
                .contains("`LIKE`")
        );
        assert_eq!(error("SELECT DISTINCT a FROM d").1, 8);
        assert!(error("SELECT DISTINCT a FROM d").2.contains("`DISTINCT`"));
        assert!(
            error("SELECT a FROM d WHERE a IN (1, 2)")
                .2
                .contains("`IN`")
        );
        assert!(error("SELECT a FROM d LIMIT 5").2.contains("`LIMIT`"));
        assert!(error("SELECT a FROM d JOIN e").2.contains("`JOIN`"));
        assert!(
            error("SELECT a ; FROM d")
                .2
                .contains("unexpected character ';'")
        );
        assert_eq!(error("SELECT é ; FROM d").1, 8);
        assert!(
            error("SELECT case when a then b FROM d")
                .2
                .contains("`END`")
        );
        assert!(
            error("SELECT a FROM d WHERE")
                .2
                .contains("expected an expression")
        );
        assert!(
            error("SELECT from FROM d")
                .2
                .contains("expected an expression")
        );
        assert!(
            error("SELECT a FROM d extra")
                .2
                .contains("the end of the query")
        );
    }

    #[test]
    fn hostile_input_is_capped() {
        let deep = format!("SELECT {}1{} FROM d", "(".repeat(500), ")".repeat(500));
        assert!(error(&deep).2.contains("nested deeper"));
        let negations = format!("SELECT {}1 FROM d", "- ".repeat(500));
        assert!(error(&negations).2.contains("nested deeper"));
        let nots = format!("SELECT a FROM d WHERE {} a", "NOT ".repeat(500));
        assert!(error(&nots).2.contains("nested deeper"));
        let long = format!("SELECT a FROM d WHERE a = '{}'", "x".repeat(MAX_SQL_LEN));
        assert!(error(&long).2.contains("longer than"));
        assert!(error("SELECT 1e999 FROM d").2.contains("out of range"));
        let chain = format!("SELECT a{} FROM d", " + a".repeat(1000));
        assert!(error(&chain).2.contains("operators"));
    }
}
