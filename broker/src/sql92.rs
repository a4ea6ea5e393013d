//! RocketMQ-compatible SQL92 message filters: parsing, evaluation against a message, and canonical display.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

/// Longest accepted expression, in bytes.
const MAX_LEN: usize = 4096;
/// Deepest accepted nesting (parentheses, NOT, unary signs, and AST height).
const MAX_DEPTH: usize = 64;
/// Pseudo-property naming the message tag (RocketMQ's `MessageConst.PROPERTY_TAGS`).
const TAGS: &str = "TAGS";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("SQL92 filter: at position {position}: {message}")]
pub struct SqlError {
    /// 0-based character (not byte) offset into the expression.
    pub position: usize,
    pub message: String,
}

fn err<T>(position: usize, message: impl Into<String>) -> Result<T, SqlError> {
    Err(SqlError {
        position,
        message: message.into(),
    })
}

/// A parsed SQL92 filter.
///
/// Semantics follow Apache RocketMQ's `filter` module (SelectorParser.jj, ComparisonExpression,
/// LogicExpression, UnaryExpression): three-valued logic where only TRUE matches, `>`-style
/// comparisons only on numbers, and a string property converted to the type of the number it is
/// compared with. Where RocketMQ throws during evaluation (e.g. `a = 1` with `a = 'abc'`) its broker
/// drops the message; here that comparison is UNKNOWN, so neither it nor its NOT matches.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlFilter {
    root: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrOp {
    Contains,
    StartsWith,
    EndsWith,
}

impl StrOp {
    fn keyword(self) -> &'static str {
        match self {
            StrOp::Contains => "CONTAINS",
            StrOp::StartsWith => "STARTSWITH",
            StrOp::EndsWith => "ENDSWITH",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Lit(Lit),
    Prop(String),
    /// Only over properties or other negations; negated number literals are folded.
    Neg(Box<Expr>),
    Not(Box<Expr>),
    /// Flattened: never directly contains another `And`.
    And(Vec<Expr>),
    /// Flattened: never directly contains another `Or`.
    Or(Vec<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    Between {
        value: Box<Expr>,
        low: Box<Expr>,
        high: Box<Expr>,
        negated: bool,
    },
    In {
        prop: String,
        list: Vec<String>,
        negated: bool,
    },
    IsNull {
        value: Box<Expr>,
        negated: bool,
    },
    Str {
        op: StrOp,
        value: Box<Expr>,
        pattern: String,
        negated: bool,
    },
}

impl Expr {
    /// RocketMQ's `asBooleanExpression`: conditions, TRUE/FALSE/NULL, and bare properties.
    fn is_condition(&self) -> bool {
        !matches!(
            self,
            Expr::Lit(Lit::Str(_) | Lit::Int(_) | Lit::Float(_)) | Expr::Neg(_)
        )
    }

    fn describe(&self) -> &'static str {
        match self {
            Expr::Lit(Lit::Null) => "NULL",
            Expr::Lit(Lit::Bool(_)) => "a boolean literal",
            Expr::Lit(Lit::Int(_) | Lit::Float(_)) => "a number literal",
            Expr::Lit(Lit::Str(_)) => "a string literal",
            Expr::Prop(_) => "a property",
            Expr::Neg(_) => "a negated value",
            _ => "a condition",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    Not,
    And,
    Or,
    Between,
    In,
    True,
    False,
    Null,
    Is,
    Contains,
    StartsWith,
    EndsWith,
}

const KEYWORDS: [(&str, Kw); 12] = [
    ("NOT", Kw::Not),
    ("AND", Kw::And),
    ("OR", Kw::Or),
    ("BETWEEN", Kw::Between),
    ("IN", Kw::In),
    ("TRUE", Kw::True),
    ("FALSE", Kw::False),
    ("NULL", Kw::Null),
    ("IS", Kw::Is),
    ("CONTAINS", Kw::Contains),
    ("STARTSWITH", Kw::StartsWith),
    ("ENDSWITH", Kw::EndsWith),
];

fn keyword(word: &str) -> Option<Kw> {
    KEYWORDS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(word))
        .map(|&(_, kw)| kw)
}

fn kw_name(kw: Kw) -> &'static str {
    KEYWORDS.iter().find(|&&(_, k)| k == kw).map_or("?", |&(name, _)| name)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Kw(Kw),
    Op(CmpOp),
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "identifier '{s}'"),
            Tok::Str(s) => write!(f, "string {}", quote(s)),
            Tok::Int(n) => write!(f, "number {n}"),
            Tok::Float(x) => write!(f, "number {x:?}"),
            Tok::Kw(k) => f.write_str(kw_name(*k)),
            Tok::Op(op) => write!(f, "'{}'", op.symbol()),
            Tok::LParen => f.write_str("'('"),
            Tok::RParen => f.write_str("')'"),
            Tok::Comma => f.write_str("','"),
            Tok::Plus => f.write_str("'+'"),
            Tok::Minus => f.write_str("'-'"),
            Tok::Eof => f.write_str("end of input"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    pos: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

fn lex(chars: &[char]) -> Result<Vec<Token>, SqlError> {
    let at = |i: usize| chars.get(i).copied();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(c) = at(i) {
        let start = i;
        let tok = match c {
            ' ' | '\t' | '\n' | '\r' | '\x0c' => {
                i += 1;
                continue;
            }
            '-' if at(i + 1) == Some('-') => {
                // Line comment (RocketMQ requires a trailing newline; end of input is accepted here).
                while at(i).is_some_and(|c| c != '\n' && c != '\r') {
                    i += 1;
                }
                continue;
            }
            '/' if at(i + 1) == Some('*') => {
                i += 2;
                loop {
                    match at(i) {
                        None => return err(start, "unterminated comment"),
                        Some('*') if at(i + 1) == Some('/') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 2;
                continue;
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match at(i) {
                        None => return err(start, "unterminated string literal"),
                        Some('\'') if at(i + 1) == Some('\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => break,
                        Some(c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                Tok::Str(s)
            }
            c if is_ident_start(c) => {
                while at(i).is_some_and(is_ident_char) {
                    i += 1;
                }
                let word: String = chars.get(start..i).unwrap_or_default().iter().collect();
                match keyword(&word) {
                    Some(kw) => Tok::Kw(kw),
                    None => Tok::Ident(word),
                }
            }
            c if c.is_ascii_digit() || (c == '.' && at(i + 1).is_some_and(|d| d.is_ascii_digit())) => {
                lex_number(chars, &mut i)?
            }
            '.' if start > 0 && at(start - 1).is_some_and(is_ident_char) => {
                return err(
                    start,
                    "unexpected '.': property names may only contain letters, digits, '_' and '$'",
                );
            }
            '=' => {
                i += 1;
                Tok::Op(CmpOp::Eq)
            }
            '<' => {
                i += 1;
                match at(i) {
                    Some('=') => {
                        i += 1;
                        Tok::Op(CmpOp::Le)
                    }
                    Some('>') => {
                        i += 1;
                        Tok::Op(CmpOp::Ne)
                    }
                    _ => Tok::Op(CmpOp::Lt),
                }
            }
            '>' => {
                i += 1;
                if at(i) == Some('=') {
                    i += 1;
                    Tok::Op(CmpOp::Ge)
                } else {
                    Tok::Op(CmpOp::Gt)
                }
            }
            // Not in RocketMQ's grammar; accepted as an alias of `<>`.
            '!' if at(i + 1) == Some('=') => {
                i += 2;
                Tok::Op(CmpOp::Ne)
            }
            '(' | ')' | ',' | '+' | '-' => {
                i += 1;
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    ',' => Tok::Comma,
                    '+' => Tok::Plus,
                    _ => Tok::Minus,
                }
            }
            other => return err(start, format!("unexpected character {other:?}")),
        };
        out.push(Token { tok, pos: start });
    }
    out.push(Token {
        tok: Tok::Eof,
        pos: chars.len(),
    });
    Ok(out)
}

/// Numbers as in RocketMQ: `12`, `12L`, `1.5`, `1.`, `.5`, `1e3`, `1.5E-3`; always unsigned here.
fn lex_number(chars: &[char], i: &mut usize) -> Result<Tok, SqlError> {
    let start = *i;
    let digit_at = |j: usize| chars.get(j).is_some_and(|c| c.is_ascii_digit());
    let mut is_float = false;
    while digit_at(*i) {
        *i += 1;
    }
    if chars.get(*i) == Some(&'.') {
        is_float = true;
        *i += 1;
        while digit_at(*i) {
            *i += 1;
        }
    }
    if matches!(chars.get(*i), Some('e' | 'E')) {
        let sign = usize::from(matches!(chars.get(*i + 1), Some('+' | '-')));
        if digit_at(*i + 1 + sign) {
            is_float = true;
            *i += 1 + sign;
            while digit_at(*i) {
                *i += 1;
            }
        }
    }
    let text: String = chars.get(start..*i).unwrap_or_default().iter().collect();
    if is_float {
        return match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Tok::Float(x)),
            _ => err(start, format!("number {text} is out of range")),
        };
    }
    if matches!(chars.get(*i), Some('l' | 'L')) {
        *i += 1;
    }
    match text.parse::<i64>() {
        Ok(n) => Ok(Tok::Int(n)),
        Err(_) => err(start, format!("integer {text} is out of range (must fit in 64 bits)")),
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// A parsed sub-expression with its AST height and starting character position.
struct Node {
    e: Expr,
    h: usize,
    pos: usize,
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    depth: usize,
}

const NESTING_MSG: &str = "expression is nested too deeply (limit 64)";

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.i).map_or(&Tok::Eof, |t| &t.tok)
    }

    fn peek2(&self) -> &Tok {
        self.toks.get(self.i + 1).map_or(&Tok::Eof, |t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.toks.get(self.i).or(self.toks.last()).map_or(0, |t| t.pos)
    }

    fn bump(&mut self) -> Token {
        let t = self.toks.get(self.i).cloned().unwrap_or(Token {
            tok: Tok::Eof,
            pos: self.pos(),
        });
        if self.i < self.toks.len() {
            self.i += 1;
        }
        t
    }

    fn is_kw(&self, kw: Kw) -> bool {
        *self.peek() == Tok::Kw(kw)
    }

    fn enter(&mut self) -> Result<(), SqlError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(self.pos(), NESTING_MSG);
        }
        Ok(())
    }

    fn node(&self, e: Expr, h: usize, pos: usize, op_pos: usize) -> Result<Node, SqlError> {
        if h > MAX_DEPTH {
            return err(op_pos, NESTING_MSG);
        }
        Ok(Node { e, h, pos })
    }

    fn expect(&mut self, want: &Tok, context: &str) -> Result<(), SqlError> {
        if self.peek() == want {
            self.bump();
            Ok(())
        } else {
            err(self.pos(), format!("expected {want} {context}, found {}", self.peek()))
        }
    }

    fn require_condition(n: &Node, context: &str) -> Result<(), SqlError> {
        if n.e.is_condition() {
            Ok(())
        } else {
            err(
                n.pos,
                format!("expected a condition {context}, found {}", n.e.describe()),
            )
        }
    }

    fn parse(mut self) -> Result<Expr, SqlError> {
        if matches!(self.peek(), Tok::Eof) {
            return err(self.pos(), "expected a condition, found end of input");
        }
        let n = self.or_expr()?;
        if !matches!(self.peek(), Tok::Eof) {
            return err(
                self.pos(),
                format!("expected AND, OR or end of input, found {}", self.peek()),
            );
        }
        Self::require_condition(&n, "as the filter")?;
        Ok(n.e)
    }

    /// Joins two operands of AND/OR, flattening nested chains of the same operator.
    fn join(&self, l: Node, r: Node, is_and: bool, op_pos: usize) -> Result<Node, SqlError> {
        let same = |e: &Expr| {
            if is_and {
                matches!(e, Expr::And(_))
            } else {
                matches!(e, Expr::Or(_))
            }
        };
        let h = (if same(&l.e) { l.h } else { l.h + 1 }).max(if same(&r.e) { r.h } else { r.h + 1 });
        let mut items = Vec::new();
        for e in [l.e, r.e] {
            match e {
                Expr::And(v) if is_and => items.extend(v),
                Expr::Or(v) if !is_and => items.extend(v),
                other => items.push(other),
            }
        }
        let e = if is_and { Expr::And(items) } else { Expr::Or(items) };
        self.node(e, h, l.pos, op_pos)
    }

    fn or_expr(&mut self) -> Result<Node, SqlError> {
        let mut l = self.and_expr()?;
        while self.is_kw(Kw::Or) {
            let op_pos = self.bump().pos;
            let r = self.and_expr()?;
            Self::require_condition(&l, "before OR")?;
            Self::require_condition(&r, "after OR")?;
            l = self.join(l, r, false, op_pos)?;
        }
        Ok(l)
    }

    fn and_expr(&mut self) -> Result<Node, SqlError> {
        let mut l = self.not_expr()?;
        while self.is_kw(Kw::And) {
            let op_pos = self.bump().pos;
            let r = self.not_expr()?;
            Self::require_condition(&l, "before AND")?;
            Self::require_condition(&r, "after AND")?;
            l = self.join(l, r, true, op_pos)?;
        }
        Ok(l)
    }

    /// SQL-standard precedence: NOT applies to a whole comparison (RocketMQ binds it tighter, which
    /// only changes expressions that RocketMQ rejects or evaluates to a constant).
    fn not_expr(&mut self) -> Result<Node, SqlError> {
        if !self.is_kw(Kw::Not) {
            return self.equality();
        }
        let pos = self.bump().pos;
        self.enter()?;
        let inner = self.not_expr()?;
        self.depth -= 1;
        Self::require_condition(&inner, "after NOT")?;
        self.node(Expr::Not(Box::new(inner.e)), inner.h + 1, pos, pos)
    }

    fn equality(&mut self) -> Result<Node, SqlError> {
        let mut l = self.comparison()?;
        loop {
            let op_pos = self.pos();
            match self.peek().clone() {
                Tok::Op(op @ (CmpOp::Eq | CmpOp::Ne)) => {
                    self.bump();
                    let r = self.comparison()?;
                    check_equal_operands(&l, &r, op)?;
                    let h = l.h.max(r.h) + 1;
                    l = self.node(Expr::Cmp(op, Box::new(l.e), Box::new(r.e)), h, l.pos, op_pos)?;
                }
                Tok::Kw(Kw::Is) => {
                    self.bump();
                    let negated = self.is_kw(Kw::Not);
                    if negated {
                        self.bump();
                    }
                    let context = if negated { "after IS NOT" } else { "after IS" };
                    self.expect(&Tok::Kw(Kw::Null), context)?;
                    l = self.node(
                        Expr::IsNull {
                            value: Box::new(l.e),
                            negated,
                        },
                        l.h + 1,
                        l.pos,
                        op_pos,
                    )?;
                }
                _ => return Ok(l),
            }
        }
    }

    fn comparison(&mut self) -> Result<Node, SqlError> {
        let mut l = self.unary()?;
        loop {
            let op_pos = self.pos();
            let negated = self.is_kw(Kw::Not);
            let tok = if negated {
                self.peek2().clone()
            } else {
                self.peek().clone()
            };
            match tok {
                Tok::Op(op @ (CmpOp::Gt | CmpOp::Ge | CmpOp::Lt | CmpOp::Le)) if !negated => {
                    self.bump();
                    let r = self.unary()?;
                    check_numeric_operand(&l, op.symbol())?;
                    check_numeric_operand(&r, op.symbol())?;
                    let h = l.h.max(r.h) + 1;
                    l = self.node(Expr::Cmp(op, Box::new(l.e), Box::new(r.e)), h, l.pos, op_pos)?;
                }
                Tok::Kw(kw @ (Kw::Contains | Kw::StartsWith | Kw::EndsWith)) => {
                    self.i += 1 + usize::from(negated);
                    let op = match kw {
                        Kw::Contains => StrOp::Contains,
                        Kw::StartsWith => StrOp::StartsWith,
                        _ => StrOp::EndsWith,
                    };
                    let pattern = self.string_literal(&format!("after {}", op.keyword()))?;
                    let e = Expr::Str {
                        op,
                        value: Box::new(l.e),
                        pattern,
                        negated,
                    };
                    l = self.node(e, l.h + 1, l.pos, op_pos)?;
                }
                Tok::Kw(Kw::Between) => {
                    self.i += 1 + usize::from(negated);
                    let low = self.unary()?;
                    self.expect(&Tok::Kw(Kw::And), "between the BETWEEN bounds")?;
                    let high = self.unary()?;
                    for n in [&l, &low, &high] {
                        check_numeric_operand(n, "BETWEEN")?;
                    }
                    if let (Expr::Lit(a), Expr::Lit(b)) = (&low.e, &high.e)
                        && compare(&lit_val(a), &lit_val(b)) == Some(Ordering::Greater)
                    {
                        return err(low.pos, "BETWEEN lower bound is greater than its upper bound");
                    }
                    let h = l.h.max(low.h).max(high.h) + 1;
                    let e = Expr::Between {
                        value: Box::new(l.e),
                        low: Box::new(low.e),
                        high: Box::new(high.e),
                        negated,
                    };
                    l = self.node(e, h, l.pos, op_pos)?;
                }
                Tok::Kw(Kw::In) => {
                    self.i += 1 + usize::from(negated);
                    let Expr::Prop(prop) = l.e else {
                        return err(
                            l.pos,
                            format!("IN needs a property on its left, found {}", l.e.describe()),
                        );
                    };
                    self.expect(&Tok::LParen, "after IN")?;
                    let mut list = vec![self.string_literal("in the IN list")?];
                    while *self.peek() == Tok::Comma {
                        self.bump();
                        list.push(self.string_literal("in the IN list")?);
                    }
                    self.expect(&Tok::RParen, "to close the IN list")?;
                    l = self.node(Expr::In { prop, list, negated }, l.h + 1, l.pos, op_pos)?;
                }
                _ if negated => {
                    return err(
                        self.pos(),
                        format!(
                            "expected BETWEEN, IN, CONTAINS, STARTSWITH or ENDSWITH after NOT, found {}",
                            self.peek2()
                        ),
                    );
                }
                _ => return Ok(l),
            }
        }
    }

    fn string_literal(&mut self, context: &str) -> Result<String, SqlError> {
        match self.peek().clone() {
            Tok::Str(s) => {
                self.bump();
                Ok(s)
            }
            other => err(
                self.pos(),
                format!("expected a string literal {context}, found {other}"),
            ),
        }
    }

    fn unary(&mut self) -> Result<Node, SqlError> {
        match self.peek() {
            Tok::Plus => {
                self.bump();
                self.enter()?;
                let n = self.unary()?;
                self.depth -= 1;
                Ok(n)
            }
            Tok::Minus => {
                let pos = self.bump().pos;
                self.enter()?;
                let n = self.unary()?;
                self.depth -= 1;
                let e = match n.e {
                    Expr::Lit(Lit::Int(v)) => Expr::Lit(Lit::Int(v.wrapping_neg())),
                    Expr::Lit(Lit::Float(v)) => Expr::Lit(Lit::Float(-v)),
                    e @ (Expr::Prop(_) | Expr::Neg(_)) => Expr::Neg(Box::new(e)),
                    other => {
                        return err(
                            n.pos,
                            format!("'-' needs a number or a property, found {}", other.describe()),
                        );
                    }
                };
                let h = if matches!(e, Expr::Neg(_)) { n.h + 1 } else { n.h };
                self.node(e, h, pos, pos)
            }
            _ => self.primary(),
        }
    }

    fn primary(&mut self) -> Result<Node, SqlError> {
        let pos = self.pos();
        let e = match self.peek().clone() {
            Tok::Str(s) => Expr::Lit(Lit::Str(s)),
            Tok::Int(n) => Expr::Lit(Lit::Int(n)),
            Tok::Float(x) => Expr::Lit(Lit::Float(x)),
            Tok::Kw(Kw::True) => Expr::Lit(Lit::Bool(true)),
            Tok::Kw(Kw::False) => Expr::Lit(Lit::Bool(false)),
            Tok::Kw(Kw::Null) => Expr::Lit(Lit::Null),
            Tok::Ident(name) => Expr::Prop(name),
            Tok::LParen => {
                self.bump();
                self.enter()?;
                let mut n = self.or_expr()?;
                self.depth -= 1;
                self.expect(&Tok::RParen, "to close '('")?;
                n.pos = pos;
                return Ok(n);
            }
            found => {
                let prev = self.i.checked_sub(1).and_then(|j| self.toks.get(j));
                let msg = match (prev, found) {
                    (Some(p), Tok::Eof) => format!("expected a value after {}", p.tok),
                    (Some(p), f) => format!("expected a value after {}, found {f}", p.tok),
                    (None, f) => format!("expected a condition, found {f}"),
                };
                return err(pos, msg);
            }
        };
        self.bump();
        Ok(Node { e, h: 1, pos })
    }
}

/// RocketMQ's `checkEqualOperand` / `checkEqualOperandCompatability` (made symmetric).
fn check_equal_operands(l: &Node, r: &Node, op: CmpOp) -> Result<(), SqlError> {
    for n in [l, r] {
        if matches!(n.e, Expr::Lit(Lit::Null)) {
            return err(
                n.pos,
                format!(
                    "NULL cannot be compared with '{}'; use IS NULL / IS NOT NULL",
                    op.symbol()
                ),
            );
        }
    }
    if let (Expr::Lit(a), Expr::Lit(b)) = (&l.e, &r.e)
        && matches!(a, Lit::Bool(_)) != matches!(b, Lit::Bool(_))
    {
        return err(r.pos, "a boolean literal cannot be compared with a non-boolean literal");
    }
    Ok(())
}

/// RocketMQ's `checkLessThanOperand`: ordering only applies to numbers (or properties holding them).
fn check_numeric_operand(n: &Node, op: &str) -> Result<(), SqlError> {
    match n.e {
        Expr::Lit(Lit::Int(_) | Lit::Float(_)) | Expr::Prop(_) | Expr::Neg(_) => Ok(()),
        ref e => err(n.pos, format!("'{op}' compares numbers only, found {}", e.describe())),
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
}

fn lit_val(l: &Lit) -> Val<'_> {
    match l {
        Lit::Null => Val::Null,
        Lit::Bool(b) => Val::Bool(*b),
        Lit::Int(n) => Val::Int(*n),
        Lit::Float(x) => Val::Float(*x),
        Lit::Str(s) => Val::Str(s),
    }
}

/// RocketMQ's boolean view: non-boolean values (a bare property) are FALSE, NULL is unknown.
fn truth(v: Val<'_>) -> Option<bool> {
    match v {
        Val::Bool(b) => Some(b),
        Val::Null => None,
        _ => Some(false),
    }
}

fn from_truth<'a>(t: Option<bool>) -> Val<'a> {
    t.map_or(Val::Null, Val::Bool)
}

/// Java `Long.valueOf`.
fn parse_long(s: &str) -> Option<i64> {
    s.parse().ok()
}

/// Java `Double.valueOf` (decimal forms, NaN, Infinity, f/d suffix; not hex floats).
fn parse_double(s: &str) -> Option<f64> {
    let t = s.trim_matches(|c: char| c <= ' ');
    let (sign, body) = match t.strip_prefix('-') {
        Some(b) => (-1.0, b),
        None => (1.0, t.strip_prefix('+').unwrap_or(t)),
    };
    match body {
        "NaN" => return Some(f64::NAN),
        "Infinity" => return Some(sign * f64::INFINITY),
        _ => {}
    }
    let body = body.strip_suffix(['f', 'F', 'd', 'D']).unwrap_or(body);
    let starts_ok = body.starts_with(|c: char| c.is_ascii_digit() || c == '.');
    let chars_ok = body
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if !starts_ok || !chars_ok {
        return None;
    }
    body.parse::<f64>().ok().map(|v| sign * v)
}

/// RocketMQ's `__compare` for two non-null values. `None` is a conversion RocketMQ throws on;
/// incomparable types give `Less`, as RocketMQ's `-1` does.
fn compare(l: &Val<'_>, r: &Val<'_>) -> Option<Ordering> {
    use Val::{Bool, Float, Int, Str};
    match (*l, *r) {
        (Int(a), Int(b)) => Some(a.cmp(&b)),
        (Float(a), Float(b)) => Some(a.total_cmp(&b)),
        (Int(a), Float(b)) => Some((a as f64).total_cmp(&b)),
        (Float(a), Int(b)) => Some(a.total_cmp(&(b as f64))),
        (Str(a), Str(b)) => Some(a.cmp(b)),
        (Bool(a), Bool(b)) => Some(a.cmp(&b)),
        (Str(s), Int(b)) => parse_long(s).map(|a| a.cmp(&b)),
        (Int(a), Str(s)) => parse_long(s).map(|b| a.cmp(&b)),
        (Str(s), Float(b)) => parse_double(s).map(|a| a.total_cmp(&b)),
        (Float(a), Str(s)) => parse_double(s).map(|b| a.total_cmp(&b)),
        (Str(s), Bool(b)) => Some(s.eq_ignore_ascii_case("true").cmp(&b)),
        (Bool(_), Str(_)) => None,
        _ => Some(Ordering::Less),
    }
}

/// RocketMQ's `=`: deliberately asymmetric on NULL (NULL = x is unknown, x = NULL is FALSE,
/// NULL = NULL is TRUE), exactly as `ComparisonExpression.doCreateEqual`.
fn equal<'a>(l: Val<'a>, r: Val<'a>) -> Val<'a> {
    match (l, r) {
        (Val::Null, Val::Null) => Val::Bool(true),
        (Val::Null, _) => Val::Null,
        (_, Val::Null) => Val::Bool(false),
        _ => from_truth(compare(&l, &r).map(|o| o == Ordering::Equal)),
    }
}

/// RocketMQ's `>`, `>=`, `<`, `<=`: NULL on either side is unknown; two strings compare as doubles.
fn order<'a>(op: CmpOp, l: Val<'a>, r: Val<'a>) -> Val<'a> {
    let ord = match (l, r) {
        (Val::Null, _) | (_, Val::Null) => None,
        (Val::Str(a), Val::Str(b)) => parse_double(a).zip(parse_double(b)).map(|(a, b)| a.total_cmp(&b)),
        _ => compare(&l, &r),
    };
    from_truth(ord.map(|o| match op {
        CmpOp::Gt => o == Ordering::Greater,
        CmpOp::Ge => o != Ordering::Less,
        CmpOp::Lt => o == Ordering::Less,
        CmpOp::Le => o != Ordering::Greater,
        CmpOp::Eq => o == Ordering::Equal,
        CmpOp::Ne => o != Ordering::Equal,
    }))
}

fn and3(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(false), _) | (_, Some(false)) => Some(false),
        (Some(true), Some(true)) => Some(true),
        _ => None,
    }
}

fn or3(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (Some(false), Some(false)) => Some(false),
        _ => None,
    }
}

struct Ctx<'a> {
    tag: &'a str,
    props: &'a [(String, String)],
}

impl<'a> Ctx<'a> {
    fn get(&self, name: &str) -> Val<'a> {
        if name == TAGS {
            return if self.tag.is_empty() {
                Val::Null
            } else {
                Val::Str(self.tag)
            };
        }
        self.props
            .iter()
            .find(|(k, _)| k == name)
            .map_or(Val::Null, |(_, v)| Val::Str(v))
    }

    /// Kleene AND/OR over a chain, stopping once the result is decided.
    fn chain(
        &self,
        items: &'a [Expr],
        start: Option<bool>,
        op: fn(Option<bool>, Option<bool>) -> Option<bool>,
    ) -> Option<bool> {
        let decided = start.map(|b| !b);
        let mut acc = start;
        for item in items {
            acc = op(acc, truth(self.eval(item)));
            if acc.is_some() && acc == decided {
                break;
            }
        }
        acc
    }

    fn eval(&self, e: &'a Expr) -> Val<'a> {
        match e {
            Expr::Lit(l) => lit_val(l),
            Expr::Prop(name) => self.get(name),
            // RocketMQ negates only numbers; property values are strings, so this is NULL.
            Expr::Neg(inner) => match self.eval(inner) {
                Val::Int(n) => Val::Int(n.wrapping_neg()),
                Val::Float(x) => Val::Float(-x),
                _ => Val::Null,
            },
            Expr::Not(inner) => from_truth(truth(self.eval(inner)).map(|b| !b)),
            Expr::And(items) => from_truth(self.chain(items, Some(true), and3)),
            Expr::Or(items) => from_truth(self.chain(items, Some(false), or3)),
            Expr::Cmp(op, l, r) => {
                let (l, r) = (self.eval(l), self.eval(r));
                match op {
                    CmpOp::Eq => equal(l, r),
                    CmpOp::Ne => from_truth(truth(equal(l, r)).map(|b| !b)),
                    _ => order(*op, l, r),
                }
            }
            Expr::Between {
                value,
                low,
                high,
                negated,
            } => {
                let (v, lo, hi) = (self.eval(value), self.eval(low), self.eval(high));
                let t = if *negated {
                    or3(truth(order(CmpOp::Lt, v, lo)), truth(order(CmpOp::Gt, v, hi)))
                } else {
                    and3(truth(order(CmpOp::Ge, v, lo)), truth(order(CmpOp::Le, v, hi)))
                };
                from_truth(t)
            }
            Expr::In { prop, list, negated } => match self.get(prop) {
                Val::Str(s) => Val::Bool(list.iter().any(|x| x == s) != *negated),
                _ => Val::Null,
            },
            Expr::IsNull { value, negated } => Val::Bool((self.eval(value) == Val::Null) != *negated),
            // RocketMQ: an empty pattern, NULL or non-string value is FALSE for both plain and NOT forms.
            Expr::Str {
                op,
                value,
                pattern,
                negated,
            } => match self.eval(value) {
                Val::Str(s) if !pattern.is_empty() => {
                    let hit = match op {
                        StrOp::Contains => s.contains(pattern.as_str()),
                        StrOp::StartsWith => s.starts_with(pattern.as_str()),
                        StrOp::EndsWith => s.ends_with(pattern.as_str()),
                    };
                    Val::Bool(hit != *negated)
                }
                _ => Val::Bool(false),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

impl SqlFilter {
    pub fn parse(expr: &str) -> Result<SqlFilter, SqlError> {
        if expr.len() > MAX_LEN {
            let position = expr.char_indices().take_while(|&(b, _)| b < MAX_LEN).count();
            return err(position, format!("expression is longer than {MAX_LEN} bytes"));
        }
        let chars: Vec<char> = expr.chars().collect();
        let toks = lex(&chars)?;
        let root = Parser { toks, i: 0, depth: 0 }.parse()?;
        Ok(SqlFilter { root })
    }

    /// `tag`: the message's tag ("" = none); `properties`: its user properties.
    pub fn matches(&self, tag: &str, properties: &[(String, String)]) -> bool {
        let ctx = Ctx { tag, props: properties };
        truth(ctx.eval(&self.root)) == Some(true)
    }

    /// The tags the expression can only match when it has the shape `TAGS = 'x'` / `TAGS IN (...)`
    /// ANDed at top level (an OR of such shapes unions them), for a cheap prefilter; None when no
    /// such restriction.
    pub fn required_tags(&self) -> Option<Vec<String>> {
        tag_set(&self.root).map(|s| s.into_iter().collect())
    }
}

fn tag_set(e: &Expr) -> Option<BTreeSet<String>> {
    // An empty tag is NULL, so '' can never be the matching tag.
    let non_empty = |v: &[String]| v.iter().filter(|s| !s.is_empty()).cloned().collect::<BTreeSet<_>>();
    match e {
        Expr::Cmp(CmpOp::Eq, l, r) => match (l.as_ref(), r.as_ref()) {
            (Expr::Prop(p), Expr::Lit(Lit::Str(s))) | (Expr::Lit(Lit::Str(s)), Expr::Prop(p)) if p == TAGS => {
                Some(non_empty(std::slice::from_ref(s)))
            }
            _ => None,
        },
        Expr::In {
            prop,
            list,
            negated: false,
        } if prop == TAGS => Some(non_empty(list)),
        Expr::And(items) => items
            .iter()
            .filter_map(tag_set)
            .reduce(|a, b| a.intersection(&b).cloned().collect()),
        Expr::Or(items) => items.iter().map(tag_set).try_fold(BTreeSet::new(), |mut acc, s| {
            acc.extend(s?);
            Some(acc)
        }),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Display (canonical text; re-parses to an equal filter)
// ---------------------------------------------------------------------------------------------

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Binding strength, matching the parser's levels; a child weaker than required gets parentheses.
fn level(e: &Expr) -> u8 {
    match e {
        Expr::Or(_) => 1,
        Expr::And(_) => 2,
        Expr::Not(_) => 3,
        Expr::Cmp(CmpOp::Eq | CmpOp::Ne, ..) | Expr::IsNull { .. } => 4,
        Expr::Cmp(..) | Expr::Between { .. } | Expr::In { .. } | Expr::Str { .. } => 5,
        Expr::Neg(_) => 6,
        Expr::Lit(Lit::Int(n)) if *n < 0 => 6,
        Expr::Lit(Lit::Float(x)) if x.is_sign_negative() => 6,
        Expr::Lit(_) | Expr::Prop(_) => 7,
    }
}

struct Show<'a>(&'a Expr, u8);

impl fmt::Display for Show<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Show(e, min) = *self;
        if level(e) < min {
            return write!(f, "({})", Show(e, 0));
        }
        let not = |negated: bool| if negated { "NOT " } else { "" };
        match e {
            Expr::Lit(Lit::Null) => f.write_str("NULL"),
            Expr::Lit(Lit::Bool(b)) => f.write_str(if *b { "TRUE" } else { "FALSE" }),
            Expr::Lit(Lit::Int(n)) => write!(f, "{n}"),
            // Debug keeps a '.' or exponent and is the shortest exact round-trip form.
            Expr::Lit(Lit::Float(x)) => write!(f, "{x:?}"),
            Expr::Lit(Lit::Str(s)) => f.write_str(&quote(s)),
            Expr::Prop(p) => f.write_str(p),
            // Level 7 keeps "--" (a comment) from ever being printed.
            Expr::Neg(inner) => write!(f, "-{}", Show(inner, 7)),
            Expr::Not(inner) => write!(f, "NOT {}", Show(inner, 3)),
            Expr::And(items) | Expr::Or(items) => {
                let (sep, child) = if matches!(e, Expr::And(_)) {
                    (" AND ", 3)
                } else {
                    (" OR ", 2)
                };
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    write!(f, "{}", Show(item, child))?;
                }
                Ok(())
            }
            Expr::Cmp(op, l, r) => {
                let (lmin, rmin) = if matches!(op, CmpOp::Eq | CmpOp::Ne) {
                    (4, 5)
                } else {
                    (5, 6)
                };
                write!(f, "{} {} {}", Show(l, lmin), op.symbol(), Show(r, rmin))
            }
            Expr::Between {
                value,
                low,
                high,
                negated,
            } => {
                write!(
                    f,
                    "{} {}BETWEEN {} AND {}",
                    Show(value, 5),
                    not(*negated),
                    Show(low, 6),
                    Show(high, 6)
                )
            }
            Expr::In { prop, list, negated } => {
                let items: Vec<String> = list.iter().map(|s| quote(s)).collect();
                write!(f, "{prop} {}IN ({})", not(*negated), items.join(", "))
            }
            Expr::IsNull { value, negated } => write!(f, "{} IS {}NULL", Show(value, 4), not(*negated)),
            Expr::Str {
                op,
                value,
                pattern,
                negated,
            } => {
                write!(
                    f,
                    "{} {}{} {}",
                    Show(value, 5),
                    not(*negated),
                    op.keyword(),
                    quote(pattern)
                )
            }
        }
    }
}

impl fmt::Display for SqlFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Show(&self.root, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn props(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// (expression, tag, properties, expected match)
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        bool,
    );
    const CASES: &[Case] = &[
        // = and <> on strings
        ("a = 'x'", "", &[("a", "x")], true),
        ("a = 'x'", "", &[("a", "y")], false),
        ("a = 'x'", "", &[], false),
        ("a <> 'x'", "", &[("a", "y")], true),
        ("a <> 'x'", "", &[("a", "x")], false),
        ("a <> 'x'", "", &[], false),
        ("a != 'x'", "", &[("a", "y")], true),
        // numbers vs string properties
        ("a = 10", "", &[("a", "10")], true),
        ("a = 10", "", &[("a", "+10")], true),
        ("a = 10", "", &[("a", "abc")], false),
        ("a <> 10", "", &[("a", "abc")], false),
        ("NOT (a = 10)", "", &[("a", "abc")], false),
        ("a = 10.0", "", &[("a", "10")], true),
        ("a > 5", "", &[("a", "6")], true),
        ("a > 5", "", &[("a", "5")], false),
        ("a >= 5", "", &[("a", "5")], true),
        ("a < 5", "", &[("a", "-7")], true),
        ("a <= -7", "", &[("a", "-7")], true),
        ("a > 5", "", &[("a", "x")], false),
        ("a > 5", "", &[], false),
        ("a > 3.14", "", &[("a", "3.1415")], true),
        ("a > 3.1E10", "", &[("a", "3.1415E10")], true),
        ("a < .5", "", &[("a", "0.25")], true),
        ("a > b", "", &[("a", "20"), ("b", "10")], true),
        ("a > b", "", &[("a", "20"), ("b", "x")], false),
        // Integer literal: RocketMQ converts the property with Long.valueOf, so "5.5" does not compare.
        ("a > 5", "", &[("a", "5.5")], false),
        ("a > 5.0", "", &[("a", "5.5")], true),
        ("a = 9223372036854775807", "", &[("a", "9223372036854775807")], true),
        ("a = -a2", "", &[("a", "1"), ("a2", "-1")], false),
        // BETWEEN
        ("a BETWEEN 1 AND 3", "", &[("a", "2")], true),
        ("a BETWEEN 1 AND 3", "", &[("a", "3")], true),
        ("a BETWEEN 1 AND 3", "", &[("a", "4")], false),
        ("a BETWEEN 1 AND 3", "", &[("a", "abc")], false),
        ("a NOT BETWEEN 1 AND 3", "", &[("a", "4")], true),
        ("a NOT BETWEEN 1 AND 3", "", &[("a", "2")], false),
        ("a NOT BETWEEN 1 AND 3", "", &[], false),
        ("a BETWEEN -1.5 AND 1.5", "", &[("a", "0")], true),
        // IN
        ("a IN ('x', 'y')", "", &[("a", "y")], true),
        ("a IN ('x', 'y')", "", &[("a", "z")], false),
        ("a NOT IN ('x', 'y')", "", &[("a", "z")], true),
        ("a NOT IN ('x', 'y')", "", &[], false),
        // IS NULL
        ("a IS NULL", "", &[], true),
        ("a IS NULL", "", &[("a", "")], false),
        ("a IS NOT NULL", "", &[("a", "")], true),
        ("a IS NOT NULL", "", &[], false),
        // CONTAINS / STARTSWITH / ENDSWITH
        ("a CONTAINS 'bc'", "", &[("a", "abcd")], true),
        ("a NOT CONTAINS 'bc'", "", &[("a", "abcd")], false),
        ("a NOT CONTAINS 'x'", "", &[], false),
        ("NOT (a CONTAINS 'x')", "", &[], true),
        ("a CONTAINS ''", "", &[("a", "abc")], false),
        ("a NOT CONTAINS ''", "", &[("a", "abc")], false),
        ("a STARTSWITH 'ab'", "", &[("a", "abc")], true),
        ("a NOT STARTSWITH 'ab'", "", &[("a", "xabc")], true),
        ("a ENDSWITH 'bc'", "", &[("a", "abc")], true),
        ("a NOT ENDSWITH 'bc'", "", &[("a", "abc")], false),
        // TAGS
        ("TAGS = 'tagA'", "tagA", &[], true),
        ("TAGS = 'tagA'", "tagB", &[], false),
        ("TAGS IS NULL", "", &[], true),
        ("TAGS IN ('tagA', 'tagB') AND a = '1'", "tagB", &[("a", "1")], true),
        ("TAGS = 'x'", "", &[("TAGS", "x")], false),
        // logic, NOT, three-valued results, precedence
        ("a = '1' OR b = '1' AND c = '1'", "", &[("a", "1")], true),
        ("(a = '1' OR b = '1') AND c = '1'", "", &[("a", "1")], false),
        ("NOT a = '1' AND b = '1'", "", &[("a", "2"), ("b", "1")], true),
        ("NOT NOT a = '1'", "", &[("a", "1")], true),
        ("a = '1' OR b = '1'", "", &[("b", "1")], true),
        ("a = '1' AND b = '1'", "", &[("a", "1")], false),
        ("NOT (a = '1' AND b = '1')", "", &[("a", "1")], false),
        ("NOT (a = '1' AND b = '1')", "", &[("a", "2")], true),
        ("TRUE", "", &[], true),
        ("FALSE OR TRUE", "", &[], true),
        ("NULL", "", &[], false),
        ("NOT NULL", "", &[], false),
        // RocketMQ quirks kept for compatibility
        ("a", "", &[("a", "true")], false),
        ("NOT a", "", &[("a", "x")], true),
        ("'x' = a", "", &[], false),
        ("'x' <> a", "", &[], true),
        ("a = b", "", &[], true),
        ("a = TRUE", "", &[("a", "True")], true),
        ("a = FALSE", "", &[("a", "nope")], true),
        ("(a = '1') = TRUE", "", &[("a", "1")], true),
        // keywords are case-insensitive, identifiers are not
        ("a is not null and A is null", "", &[("a", "1")], true),
        ("a between 1 and 2 Or b In ('q')", "", &[("b", "q")], true),
        ("tags = 'tagA'", "tagA", &[], false),
        // strings: '' escapes, other characters verbatim
        ("a = 'it''s'", "", &[("a", "it's")], true),
        ("a = ''''", "", &[("a", "'")], true),
        ("a = 'é -- /* x */'", "", &[("a", "é -- /* x */")], true),
        ("a IN ('', 'x')", "", &[("a", "")], true),
        // comments, whitespace and numeric suffixes
        ("/* c */ a = 1L -- trailing", "", &[("a", "1")], true),
        ("\ta\n=\r\n'x'", "", &[("a", "x")], true),
        ("$x_1 = 1", "", &[("$x_1", "1")], true),
    ];

    #[test]
    fn evaluation_table() {
        for &(expr, tag, kv, expected) in CASES {
            let f = SqlFilter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            assert_eq!(
                f.matches(tag, &props(kv)),
                expected,
                "{expr} with tag {tag:?} and {kv:?}"
            );
            let again = SqlFilter::parse(&f.to_string()).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(again, f, "{expr} displayed as {f}");
        }
    }

    /// (expression, expected error position, a fragment of the message)
    const MALFORMED: &[(&str, usize, &str)] = &[
        ("", 0, "expected a condition, found end of input"),
        ("   ", 3, "expected a condition"),
        ("price >", 7, "expected a value after '>'"),
        ("price > AND", 8, "expected a value after '>', found AND"),
        ("a = 'x", 4, "unterminated string literal"),
        ("a = 1 b", 6, "expected AND, OR or end of input, found identifier 'b'"),
        ("(a = 1", 6, "expected ')' to close '('"),
        ("a = 1)", 5, "found ')'"),
        ("a > 'x'", 4, "'>' compares numbers only, found a string literal"),
        ("a IN ()", 6, "expected a string literal in the IN list"),
        (
            "a IN (1)",
            6,
            "expected a string literal in the IN list, found number 1",
        ),
        ("'x' IN ('x')", 0, "IN needs a property"),
        ("a BETWEEN 1 2", 12, "expected AND between the BETWEEN bounds"),
        ("a BETWEEN 3 AND 1", 10, "lower bound is greater"),
        ("a = NULL", 4, "use IS NULL"),
        ("a IS 1", 5, "expected NULL after IS"),
        (
            "a NOT LIKE 'x'",
            2,
            "expected BETWEEN, IN, CONTAINS, STARTSWITH or ENDSWITH after NOT",
        ),
        ("a CONTAINS b", 11, "expected a string literal after CONTAINS"),
        ("a.b = 1", 1, "property names may only contain"),
        ("a # 1", 2, "unexpected character '#'"),
        ("a = 99999999999999999999", 4, "out of range"),
        ("a = 1e999", 4, "out of range"),
        ("'x'", 0, "expected a condition as the filter, found a string literal"),
        (
            "a = 1 AND 5",
            10,
            "expected a condition after AND, found a number literal",
        ),
        ("TRUE = 1", 7, "boolean literal cannot be compared"),
        ("a = -'x'", 5, "'-' needs a number or a property"),
        ("é = 1", 0, "unexpected character 'é'"),
        ("a = 'é' AND", 11, "expected a value after AND"),
        ("/* x", 0, "unterminated comment"),
        ("a ! 1", 2, "unexpected character '!'"),
    ];

    #[test]
    fn malformed_table() {
        for &(expr, position, fragment) in MALFORMED {
            let e = SqlFilter::parse(expr).expect_err(expr);
            assert_eq!(e.position, position, "{expr}: {e}");
            assert!(e.message.contains(fragment), "{expr}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("SQL92 filter: at position {position}: "))
            );
        }
    }

    #[test]
    fn limits() {
        let long = format!("a = '{}'", "x".repeat(MAX_LEN));
        assert_eq!(SqlFilter::parse(&long).expect_err("long").position, MAX_LEN);
        let ok = format!("{}a = 1{}", "(".repeat(MAX_DEPTH - 1), ")".repeat(MAX_DEPTH - 1));
        assert!(SqlFilter::parse(&ok).is_ok());
        for deep in [
            format!("{}a = 1{}", "(".repeat(2000), ")".repeat(2000)),
            format!("{}TRUE", "NOT ".repeat(1000)),
            format!("a = {}1", "- ".repeat(2000)),
            format!("a{}", " = 1".repeat(1000)),
            format!("a{}", " IS NULL".repeat(500)),
        ] {
            let e = SqlFilter::parse(&deep).expect_err("deep");
            assert!(e.message.contains("nested too deeply"), "{e}");
        }
        // Long flat chains are not nesting.
        let chain = vec!["a = 1"; 300].join(" AND ");
        assert!(SqlFilter::parse(&chain).is_ok());
    }

    #[test]
    fn required_tags() {
        let tags = |s: &str| SqlFilter::parse(s).expect(s).required_tags();
        let v = |x: &[&str]| Some(x.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(tags("TAGS = 'a'"), v(&["a"]));
        assert_eq!(tags("'a' = TAGS AND x > 1"), v(&["a"]));
        assert_eq!(tags("TAGS IN ('b', 'a', '') AND (x > 1 OR y < 2)"), v(&["a", "b"]));
        assert_eq!(tags("TAGS IN ('a', 'b') AND TAGS = 'b'"), v(&["b"]));
        assert_eq!(tags("TAGS = 'a' AND TAGS = 'b'"), v(&[]));
        assert_eq!(tags("TAGS = 'a' OR TAGS IN ('c')"), v(&["a", "c"]));
        assert_eq!(tags("TAGS = 'a' OR x = 1"), None);
        assert_eq!(tags("TAGS NOT IN ('a')"), None);
        assert_eq!(tags("NOT TAGS = 'a'"), None);
        assert_eq!(tags("x = 'a'"), None);
    }

    #[test]
    fn display_is_canonical() {
        let show = |s: &str| SqlFilter::parse(s).expect(s).to_string();
        assert_eq!(
            show("a=1 and (b='x' or not c is null)"),
            "a = 1 AND (b = 'x' OR NOT c IS NULL)"
        );
        assert_eq!(show("a = - - 5"), "a = 5");
        assert_eq!(show("a > -(-b)"), "a > -(-b)");
        assert_eq!(show("a = 'it''s' and b != 2.50"), "a = 'it''s' AND b <> 2.5");
        assert_eq!(show("TRUE = (a = 1)"), "TRUE = (a = 1)");
        assert_eq!(show("(a = 1 AND b = 2) AND c = 3"), "a = 1 AND b = 2 AND c = 3");
    }

    // ---- property tests ----

    const NAMES: [&str; 4] = ["a", "b", "c", "TAGS"];
    const VALUES: [&str; 9] = ["1", "2", "-3", "abc", "1.5", "", "x'y", "ab", "true"];

    /// A reference model: conditions over `prop op literal`, evaluated independently.
    #[derive(Debug, Clone)]
    enum G {
        Const(Option<bool>),
        EqStr(usize, String, bool),
        LitEqProp(String, usize),
        CmpInt(usize, CmpOp, i64),
        CmpFloat(usize, CmpOp, f64),
        Between(usize, i64, i64, bool),
        In(usize, Vec<String>, bool),
        IsNull(usize, bool),
        Str(usize, StrOp, String, bool),
        Not(Box<G>),
        And(Box<G>, Box<G>),
        Or(Box<G>, Box<G>),
    }

    fn render(g: &G) -> String {
        let not = |n: bool| if n { "NOT " } else { "" };
        match g {
            G::Const(c) => match c {
                Some(true) => "TRUE".into(),
                Some(false) => "FALSE".into(),
                None => "NULL".into(),
            },
            G::EqStr(p, s, ne) => format!("{} {} {}", NAMES[*p], if *ne { "<>" } else { "=" }, quote(s)),
            G::LitEqProp(s, p) => format!("{} = {}", quote(s), NAMES[*p]),
            G::CmpInt(p, op, n) => format!("{} {} {n}", NAMES[*p], op.symbol()),
            G::CmpFloat(p, op, x) => format!("{} {} {x:?}", NAMES[*p], op.symbol()),
            G::Between(p, lo, hi, n) => format!("{} {}BETWEEN {lo} AND {hi}", NAMES[*p], not(*n)),
            G::In(p, list, n) => {
                let items: Vec<String> = list.iter().map(|s| quote(s)).collect();
                format!("{} {}IN ({})", NAMES[*p], not(*n), items.join(","))
            }
            G::IsNull(p, n) => format!("{} IS {}NULL", NAMES[*p], not(*n)),
            G::Str(p, op, s, n) => format!("{} {}{} {}", NAMES[*p], not(*n), op.keyword(), quote(s)),
            G::Not(x) => format!("NOT ({})", render(x)),
            G::And(x, y) => format!("({}) AND ({})", render(x), render(y)),
            G::Or(x, y) => format!("({}) or ({})", render(x), render(y)),
        }
    }

    fn reference(g: &G, env: &[Option<&str>; 4]) -> Option<bool> {
        let cmp = |o: Ordering, op: &CmpOp| match op {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Ge => o != Ordering::Less,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
        };
        let int = |p: &usize| env[*p].and_then(|v| v.parse::<i64>().ok());
        match g {
            G::Const(c) => *c,
            G::EqStr(p, s, ne) => env[*p].map(|v| (v == s) != *ne),
            G::LitEqProp(s, p) => Some(env[*p] == Some(s.as_str())),
            G::CmpInt(p, op, n) => int(p).map(|v| cmp(v.cmp(n), op)),
            G::CmpFloat(p, op, x) => env[*p]
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| cmp(v.total_cmp(x), op)),
            G::Between(p, lo, hi, n) => int(p).map(|v| (*lo <= v && v <= *hi) != *n),
            G::In(p, list, n) => env[*p].map(|v| list.iter().any(|s| s == v) != *n),
            G::IsNull(p, n) => Some(env[*p].is_none() != *n),
            G::Str(p, op, s, n) => Some(match env[*p] {
                Some(v) if !s.is_empty() => {
                    let hit = match op {
                        StrOp::Contains => v.contains(s.as_str()),
                        StrOp::StartsWith => v.starts_with(s.as_str()),
                        StrOp::EndsWith => v.ends_with(s.as_str()),
                    };
                    hit != *n
                }
                _ => false,
            }),
            G::Not(x) => reference(x, env).map(|b| !b),
            G::And(x, y) => and3(reference(x, env), reference(y, env)),
            G::Or(x, y) => or3(reference(x, env), reference(y, env)),
        }
    }

    fn g_strategy() -> impl Strategy<Value = G> {
        let p = 0..NAMES.len();
        let s = prop::sample::select(VALUES.to_vec()).prop_map(str::to_string);
        let op = prop::sample::select(vec![CmpOp::Eq, CmpOp::Ne, CmpOp::Gt, CmpOp::Ge, CmpOp::Lt, CmpOp::Le]);
        let sop = prop::sample::select(vec![StrOp::Contains, StrOp::StartsWith, StrOp::EndsWith]);
        let leaf = prop_oneof![
            prop::option::of(any::<bool>()).prop_map(G::Const),
            (p.clone(), s.clone(), any::<bool>()).prop_map(|(p, s, n)| G::EqStr(p, s, n)),
            (s.clone(), p.clone()).prop_map(|(s, p)| G::LitEqProp(s, p)),
            (p.clone(), op.clone(), -4i64..4).prop_map(|(p, o, n)| G::CmpInt(p, o, n)),
            (p.clone(), op, -8i32..8).prop_map(|(p, o, n)| G::CmpFloat(p, o, f64::from(n) / 4.0)),
            (p.clone(), -4i64..4, 0i64..4, any::<bool>()).prop_map(|(p, lo, d, n)| G::Between(p, lo, lo + d, n)),
            (p.clone(), prop::collection::vec(s.clone(), 1..4), any::<bool>()).prop_map(|(p, l, n)| G::In(p, l, n)),
            (p.clone(), any::<bool>()).prop_map(|(p, n)| G::IsNull(p, n)),
            (p, sop, s, any::<bool>()).prop_map(|(p, o, s, n)| G::Str(p, o, s, n)),
        ];
        leaf.prop_recursive(5, 48, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|x| G::Not(Box::new(x))),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| G::And(Box::new(x), Box::new(y))),
                (inner.clone(), inner).prop_map(|(x, y)| G::Or(Box::new(x), Box::new(y))),
            ]
        })
    }

    fn env_strategy() -> impl Strategy<Value = [Option<&'static str>; 4]> {
        let v = prop::option::of(prop::sample::select(VALUES.to_vec()));
        [v.clone(), v.clone(), v.clone(), v]
    }

    /// Token soup that often parses, to reach deep parser paths.
    /// Grammar-shaped text, including forms that fail type checks, to reach deep parser paths.
    fn shaped() -> impl Strategy<Value = String> {
        let leaf = prop::sample::select(vec![
            "a",
            "b",
            "TAGS",
            "1",
            "-2",
            "2.5",
            "1e3",
            "0.0",
            "'x'",
            "''''",
            "TRUE",
            "FALSE",
            "NULL",
            "-a",
            "a IN ('x', 'y')",
        ])
        .prop_map(str::to_string);
        leaf.prop_recursive(6, 64, 3, |inner| {
            let op = prop::sample::select(vec![
                "=",
                "<>",
                "!=",
                ">",
                ">=",
                "<",
                "<=",
                "AND",
                "OR",
                "and",
                "CONTAINS",
                "NOT STARTSWITH",
                "ENDSWITH",
            ]);
            let unary = prop::sample::select(vec!["NOT {}", "({})", "- {}", "+{}", "{} IS NULL", "{} is not null"]);
            prop_oneof![
                (inner.clone(), op, inner.clone()).prop_map(|(l, o, r)| format!("{l} {o} {r}")),
                (unary, inner.clone()).prop_map(|(u, x)| u.replace("{}", &x)),
                (inner.clone(), any::<bool>(), inner.clone(), inner)
                    .prop_map(|(v, n, lo, hi)| { format!("{v} {}BETWEEN {lo} AND {hi}", if n { "NOT " } else { "" }) }),
            ]
        })
    }

    fn soup() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "a",
            "b",
            "TAGS",
            "1",
            "-",
            "+",
            "2.5",
            "1e3",
            "'x'",
            "''''",
            "=",
            "<>",
            "!=",
            ">",
            ">=",
            "<",
            "<=",
            "(",
            ")",
            ",",
            "AND",
            "or",
            "NOT",
            "IN",
            "BETWEEN",
            "IS",
            "NULL",
            "TRUE",
            "false",
            "CONTAINS",
            "startswith",
            "ENDSWITH",
            "--",
            "/*",
            "*/",
            "'",
            ".",
            "é",
            "9223372036854775808",
        ]);
        prop::collection::vec(piece, 0..24).prop_map(|v| v.join(" "))
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in any::<String>(), t in soup(), u in shaped()) {
            let _ = SqlFilter::parse(&s);
            for f in [SqlFilter::parse(&t), SqlFilter::parse(&u)].into_iter().flatten() {
                let _ = f.matches("x", &props(&[("a", "1"), ("b", "zz")]));
                let _ = f.required_tags();
            }
        }

        #[test]
        fn display_round_trips(g in g_strategy(), t in soup(), u in shaped()) {
            for text in [render(&g), t, u] {
                if let Ok(f) = SqlFilter::parse(&text) {
                    let shown = f.to_string();
                    let again = SqlFilter::parse(&shown);
                    prop_assert_eq!(again.as_ref(), Ok(&f), "{} -> {}", text, shown);
                }
            }
        }

        #[test]
        fn matches_reference(g in g_strategy(), env in env_strategy()) {
            let text = render(&g);
            let f = SqlFilter::parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            let reparsed = SqlFilter::parse(&f.to_string()).map_err(|e| TestCaseError::fail(format!("{f}: {e}")))?;
            let tag = env[3].unwrap_or("");
            let kv: Vec<(String, String)> = env[..3]
                .iter()
                .zip(NAMES)
                .filter_map(|(v, k)| v.map(|v| (k.to_string(), v.to_string())))
                .collect();
            let env = [env[0], env[1], env[2], env[3].filter(|t| !t.is_empty())];
            let expected = reference(&g, &env) == Some(true);
            prop_assert_eq!(f.matches(tag, &kv), expected, "{}", text);
            prop_assert_eq!(reparsed.matches(tag, &kv), expected, "{}", f);
        }
    }
}
