//! The expression language of edge conditions, edge transforms, loop conditions and the
//! `transform` node: a small, safe subset of JavaScript over JSON values.
//!
//! - Property paths: `a.b.c`, `a["x-y"]`, `a['k']`, `a[0]`, `a[i + 1]`; `.length` of arrays
//!   and strings. A missing member is `undefined`; reading a member *of* `undefined` or
//!   `null` is what JavaScript throws on, and Flowcraft's evaluator catches as `undefined`:
//!   the whole expression is then `undefined` (false as a condition, `null` as a value). A
//!   name not in scope at all is `undefined` with its members, without throwing: context
//!   keys are flat names (`_outputs.n1.total ?? 0` reads 0 before `_outputs.n1` exists).
//!   `undefined` compares false with everything (`missing <= 100` is false), where `null`
//!   compares as 0.
//! - Literals: numbers, `'…'`/`"…"` strings, `true`, `false`, `null`, `undefined`, arrays
//!   `[1, x]` and objects `{total: a + b, "k-2": c}`.
//! - Operators, by JavaScript precedence: `! - +` (unary); `* / %`; `+ -`; `< <= > >=`;
//!   `== != === !==`; `&&`; `|| ??`; `? :`; parentheses. `&&`/`||` yield an operand as JS
//!   does.
//! - A fixed table of pure methods and functions: `includes`, `startsWith`, `endsWith`,
//!   `indexOf`, `toLowerCase`, `toUpperCase`, `trim`, `slice` (of strings; `includes`,
//!   `indexOf`, `slice` of arrays too), `Math.min/max/round/floor/ceil/abs`,
//!   `Array.isArray`. Nothing else can be called.
//! - JavaScript semantics: loose and strict equality, string concatenation with `+`, numeric
//!   comparison after conversion (strings compare lexicographically), truthiness.
//! - Flat context keys: the run context stores `_outputs.n1` as *one* key. When a path's root
//!   is not in scope, the following dotted names are joined to it, shortest match first, so
//!   `_outputs.n1.total` reads key `_outputs.n1`, then `.total`.
//! - Hyphenated keys: `fetch-user.name` (no spaces around `-`) reads the key `fetch-user` when
//!   it exists and is the subtraction `fetch - user.name` otherwise.
//!
//! There are no other calls, no assignments and no loops: evaluation does work linear in
//! the size of the expression and of the values it reads and builds (an expression that
//! builds large values, such as a long chain of string concatenations, builds them).
//! Sources are limited to [`MAX_SOURCE_LEN`] characters and [`MAX_DEPTH`] levels of nesting.
//! A problem never panics: parse errors are [`ExprError`]s, and evaluation problems yield
//! `null` (which is falsy).
//!
//! ```
//! use flowcraft_rabbitmq::expr::Expression;
//! let scope = serde_json::json!({"result": {"output": {"total": 150}}, "mode": "fast"});
//! let e = Expression::parse("result.output.total > 100 && mode == 'fast'").unwrap();
//! assert!(e.evaluate_bool(&scope));
//! ```

use std::borrow::Cow;
use std::fmt;

use serde_json::{Map, Number, Value};

/// Longest accepted source, in bytes.
pub const MAX_SOURCE_LEN: usize = 4096;
/// Deepest accepted nesting (parentheses, brackets, unary operators).
pub const MAX_DEPTH: usize = 64;
/// Deepest accepted syntax tree (long operator chains count too).
const MAX_TREE_DEPTH: usize = 256;

/// Something names can be looked up in: the top level of an evaluation scope.
pub trait Scope {
    /// The value of a top-level name.
    fn lookup(&self, key: &str) -> Option<&Value>;

    /// Whether the name `key` is costly to look up whole (a run's context): a path under it
    /// then tries the flat keys `key.a`, `key.a.b`, … first, and the name itself last.
    /// Both orders give the same value when `lookup("key.a")` is `lookup("key")["a"]`.
    fn defers(&self, _key: &str) -> bool {
        false
    }
}

impl Scope for Map<String, Value> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }
}

impl Scope for Value {
    fn lookup(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(m) => m.get(key),
            _ => None,
        }
    }
}

/// A parse error, with the byte position it was found at.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    /// What is wrong, e.g. `unexpected end of expression` or `unterminated string`.
    pub message: String,
    /// 0-based byte offset into the source; `Display` shows it as a 1-based column.
    pub position: usize,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.message, self.position + 1)
    }
}

impl std::error::Error for ExprError {}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Mul,
    Div,
    Rem,
    Add,
    Sub,
    Lt,
    Le,
    Gt,
    Ge,
    LooseEq,
    LooseNe,
    StrictEq,
    StrictNe,
    And,
    Or,
    Nullish,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum UnOp {
    Not,
    Neg,
    Plus,
}

#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Computed(Box<Expr>),
}

#[derive(Debug, Clone)]
enum Expr {
    Literal(Value),
    /// A path from a top-level name.
    Path {
        root: String,
        segments: Vec<Segment>,
    },
    /// A path from a hyphenated name; `fallback` is the subtraction it reads as otherwise.
    Hyphenated {
        path: Box<Expr>,
        fallback: Box<Expr>,
    },
    /// Member access on a computed value, e.g. `(a ?? b).c`.
    Member {
        base: Box<Expr>,
        segments: Vec<Segment>,
    },
    Array(Vec<Expr>),
    Object(Vec<(String, Expr)>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `cond ? then : otherwise`.
    Conditional(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `undefined`.
    Undefined,
    /// A method of the fixed table on a value: `s.includes(x)`, `a.slice(1)`, ….
    Method {
        target: Box<Expr>,
        method: Method,
        args: Vec<Expr>,
    },
    /// A function of the fixed table: `Math.max(a, b)`, `Array.isArray(x)`.
    Function(Function, Vec<Expr>),
}

/// The methods an expression may call: pure, and linear in their input.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    Includes,
    StartsWith,
    EndsWith,
    IndexOf,
    ToLowerCase,
    ToUpperCase,
    Trim,
    Slice,
}

impl Method {
    /// How many arguments the table's version takes (position arguments are not
    /// supported: refused at parse time rather than ignored).
    fn arity(self) -> std::ops::RangeInclusive<usize> {
        match self {
            Method::Includes | Method::StartsWith | Method::EndsWith | Method::IndexOf => 1..=1,
            Method::ToLowerCase | Method::ToUpperCase | Method::Trim => 0..=0,
            Method::Slice => 0..=2,
        }
    }

    fn named(name: &str) -> Option<Method> {
        Some(match name {
            "includes" => Method::Includes,
            "startsWith" => Method::StartsWith,
            "endsWith" => Method::EndsWith,
            "indexOf" => Method::IndexOf,
            "toLowerCase" => Method::ToLowerCase,
            "toUpperCase" => Method::ToUpperCase,
            "trim" => Method::Trim,
            "slice" => Method::Slice,
            _ => return None,
        })
    }
}

/// The functions an expression may call.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Function {
    Min,
    Max,
    Round,
    Floor,
    Ceil,
    Abs,
    IsArray,
}

impl Function {
    fn arity(self) -> std::ops::RangeInclusive<usize> {
        match self {
            Function::Min | Function::Max => 0..=usize::MAX,
            _ => 1..=1,
        }
    }

    fn named(object: &str, name: &str) -> Option<Function> {
        Some(match (object, name) {
            ("Math", "min") => Function::Min,
            ("Math", "max") => Function::Max,
            ("Math", "round") => Function::Round,
            ("Math", "floor") => Function::Floor,
            ("Math", "ceil") => Function::Ceil,
            ("Math", "abs") => Function::Abs,
            ("Array", "isArray") => Function::IsArray,
            _ => return None,
        })
    }
}

/// A compiled expression. Parse once, evaluate many times.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    ast: Expr,
}

impl Expression {
    /// Compiles an expression.
    pub fn parse(source: &str) -> Result<Expression, ExprError> {
        if source.len() > MAX_SOURCE_LEN {
            return Err(ExprError {
                message: format!("expression is longer than {MAX_SOURCE_LEN} characters"),
                position: MAX_SOURCE_LEN,
            });
        }
        let tokens = lex(source)?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            depth: 0,
            end: source.len(),
        };
        let ast = parser.expression()?;
        if let Some(t) = parser.peek() {
            return Err(ExprError {
                message: format!("unexpected {}", t.kind.describe()),
                position: t.pos,
            });
        }
        if tree_depth(&ast) > MAX_TREE_DEPTH {
            return Err(ExprError {
                message: format!("expression nests deeper than {MAX_TREE_DEPTH} operations"),
                position: 0,
            });
        }
        Ok(Expression {
            source: source.to_string(),
            ast,
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates over a scope. Never panics; problems yield `null`. A member access on a
    /// missing or `null` value (a `TypeError` in JavaScript, which Flowcraft catches) makes
    /// the whole expression `undefined`, which is `null` here and false as a condition.
    pub fn evaluate(&self, scope: &dyn Scope) -> Value {
        guarded(|| eval(&self.ast, scope).into_owned()).unwrap_or(Value::Null)
    }

    /// Evaluates and applies JavaScript truthiness (see [`evaluate`](Self::evaluate)).
    pub fn evaluate_bool(&self, scope: &dyn Scope) -> bool {
        guarded(|| truthy(&eval(&self.ast, scope))).unwrap_or(false)
    }
}

/// Parses and evaluates in one step; a parse error logs a warning and yields `null`.
pub fn evaluate(source: &str, scope: &dyn Scope) -> Value {
    match Expression::parse(source) {
        Ok(e) => e.evaluate(scope),
        Err(err) => {
            log::warn!("expression '{source}' does not parse: {err}");
            Value::Null
        }
    }
}

/// JavaScript truthiness: `false`, `0`, `NaN`, `""`, `null` and missing are false.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

// ---------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    Number(f64),
    Str(String),
    Ident(String),
    Punct(&'static str),
}

impl TokenKind {
    fn describe(&self) -> String {
        match self {
            TokenKind::Number(n) => format!("number {n}"),
            TokenKind::Str(s) => format!("string '{s}'"),
            TokenKind::Ident(s) => format!("name '{s}'"),
            TokenKind::Punct(p) => format!("'{p}'"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    pos: usize,
}

const PUNCTS: &[&str] = &[
    "===", "!==", "==", "!=", "<=", ">=", "&&", "||", "??", "<", ">", "!", "+", "-", "*", "/", "%",
    "(", ")", "[", "]", "{", "}", ",", ":", ".", "?",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

fn lex(src: &str) -> Result<Vec<Token>, ExprError> {
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let err = |message: String, position: usize| Err(ExprError { message, position });
    while i < chars.len() {
        let (pos, c) = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|(_, d)| d.is_ascii_digit()))
        {
            let start = i;
            while i < chars.len() && (chars[i].1.is_ascii_digit() || chars[i].1 == '.') {
                i += 1;
            }
            if i < chars.len() && (chars[i].1 == 'e' || chars[i].1 == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j].1 == '+' || chars[j].1 == '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].1.is_ascii_digit() {
                    i = j;
                    while i < chars.len() && chars[i].1.is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().map(|(_, c)| c).collect();
            match text.parse::<f64>() {
                Ok(n) => tokens.push(Token {
                    kind: TokenKind::Number(n),
                    pos,
                }),
                Err(_) => return err(format!("invalid number '{text}'"), pos),
            }
            continue;
        }
        if c == '"' || c == '\'' {
            let (s, next) = lex_string(&chars, i)?;
            tokens.push(Token {
                kind: TokenKind::Str(s),
                pos,
            });
            i = next;
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            while i < chars.len() {
                let ch = chars[i].1;
                if is_ident_char(ch) {
                    i += 1;
                } else if ch == '-' && chars.get(i + 1).is_some_and(|(_, n)| is_ident_char(*n)) {
                    // `name-other` with no spaces: a hyphenated name.
                    i += 1;
                } else {
                    break;
                }
            }
            let text: String = chars[start..i].iter().map(|(_, c)| c).collect();
            tokens.push(Token {
                kind: TokenKind::Ident(text),
                pos,
            });
            continue;
        }
        let rest = &src[pos..];
        match PUNCTS.iter().find(|p| rest.starts_with(**p)) {
            Some(p) => {
                tokens.push(Token {
                    kind: TokenKind::Punct(p),
                    pos,
                });
                i += p.chars().count();
            }
            None => return err(format!("unexpected character '{c}'"), pos),
        }
    }
    Ok(tokens)
}

fn lex_string(chars: &[(usize, char)], start: usize) -> Result<(String, usize), ExprError> {
    let (pos, quote) = chars[start];
    let mut out = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        let c = chars[i].1;
        if c == quote {
            return Ok((out, i + 1));
        }
        if c == '\\' {
            let Some(&(epos, e)) = chars.get(i + 1) else {
                break;
            };
            i += 2;
            match e {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                '0' => out.push('\0'),
                'u' => {
                    let hex: String = chars.iter().skip(i).take(4).map(|(_, c)| c).collect();
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .filter(|_| hex.len() == 4);
                    match code.and_then(char::from_u32) {
                        Some(ch) => out.push(ch),
                        None => {
                            return Err(ExprError {
                                message: "invalid \\u escape".into(),
                                position: epos,
                            })
                        }
                    }
                    i += 4;
                }
                other => out.push(other),
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    Err(ExprError {
        message: "unterminated string".into(),
        position: pos,
    })
}

// ---------------------------------------------------------------------------------------
// Parser

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_punct(&self) -> Option<&'static str> {
        match self.peek() {
            Some(Token {
                kind: TokenKind::Punct(p),
                ..
            }) => Some(p),
            _ => None,
        }
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ExprError> {
        let position = self.peek().map(|t| t.pos).unwrap_or(self.end);
        Err(ExprError {
            message: message.into(),
            position,
        })
    }

    fn unexpected<T>(&self) -> Result<T, ExprError> {
        match self.peek() {
            Some(t) => self.error(format!("unexpected {}", t.kind.describe())),
            None => self.error("unexpected end of expression"),
        }
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.error(format!("expression nests deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn expect(&mut self, punct: &str) -> Result<(), ExprError> {
        if self.peek_punct() == Some(punct) {
            self.pos += 1;
            Ok(())
        } else {
            match self.peek() {
                Some(t) => self.error(format!("expected '{punct}', found {}", t.kind.describe())),
                None => self.error(format!("expected '{punct}' before the end")),
            }
        }
    }

    fn expression(&mut self) -> Result<Expr, ExprError> {
        self.enter()?;
        let e = self.conditional();
        self.depth -= 1;
        e
    }

    /// `cond ? then : otherwise`, right-associative, below every binary operator.
    fn conditional(&mut self) -> Result<Expr, ExprError> {
        let condition = self.binary(0)?;
        if self.peek_punct() != Some("?") {
            return Ok(condition);
        }
        self.pos += 1;
        let then = self.expression()?;
        self.expect(":")?;
        let otherwise = self.expression()?;
        Ok(Expr::Conditional(
            Box::new(condition),
            Box::new(then),
            Box::new(otherwise),
        ))
    }

    /// `(a, b, …)` after a callee; the `(` is next.
    fn arguments(&mut self) -> Result<Vec<Expr>, ExprError> {
        self.expect("(")?;
        self.enter()?;
        let mut args = Vec::new();
        while self.peek_punct() != Some(")") {
            args.push(self.expression()?);
            if self.peek_punct() != Some(")") {
                self.expect(",")?;
            }
        }
        self.expect(")")?;
        self.depth -= 1;
        Ok(args)
    }

    /// A call of what `callee` names: a function of the table (`Math.max`) or a method of
    /// the table on the value before its last segment (`a.b.includes`).
    fn call(&mut self, callee: Expr) -> Result<Expr, ExprError> {
        let (base, mut segments) = match callee {
            Expr::Path { root, segments } => (None, (root, segments)),
            Expr::Member { base, segments } => (Some(base), (String::new(), segments)),
            _ => return self.error("only the methods and functions of the table can be called"),
        };
        let Some(Segment::Key(name)) = segments.1.pop() else {
            return self.error("only the methods and functions of the table can be called");
        };
        if base.is_none() && segments.1.is_empty() {
            if let Some(function) = Function::named(&segments.0, &name) {
                let args = self.arguments()?;
                if !function.arity().contains(&args.len()) {
                    return self.arity_error(&name, function.arity());
                }
                return Ok(Expr::Function(function, args));
            }
        }
        let Some(method) = Method::named(&name) else {
            return self.error(format!(
                "'{name}' is not a method or function expressions can call"
            ));
        };
        let target = match base {
            Some(base) if segments.1.is_empty() => *base,
            Some(base) => Expr::Member {
                base,
                segments: segments.1,
            },
            None if segments.0.is_empty() => return self.unexpected(),
            None => path_expr(segments.0, segments.1),
        };
        let args = self.arguments()?;
        if !method.arity().contains(&args.len()) {
            return self.arity_error(&name, method.arity());
        }
        Ok(Expr::Method {
            target: Box::new(target),
            method,
            args,
        })
    }

    fn arity_error<T>(
        &self,
        name: &str,
        arity: std::ops::RangeInclusive<usize>,
    ) -> Result<T, ExprError> {
        let takes = match (arity.start(), arity.end()) {
            (a, b) if a == b => format!("{a} argument(s)"),
            (a, b) => format!("{a} to {b} arguments"),
        };
        self.error(format!("'{name}' takes {takes} here"))
    }

    /// Precedence climbing over the binary operator levels.
    fn binary(&mut self, level: usize) -> Result<Expr, ExprError> {
        const LEVELS: &[&[(&str, BinOp)]] = &[
            &[("||", BinOp::Or), ("??", BinOp::Nullish)],
            &[("&&", BinOp::And)],
            &[
                ("===", BinOp::StrictEq),
                ("!==", BinOp::StrictNe),
                ("==", BinOp::LooseEq),
                ("!=", BinOp::LooseNe),
            ],
            &[
                ("<=", BinOp::Le),
                (">=", BinOp::Ge),
                ("<", BinOp::Lt),
                (">", BinOp::Gt),
            ],
            &[("+", BinOp::Add), ("-", BinOp::Sub)],
            &[("*", BinOp::Mul), ("/", BinOp::Div), ("%", BinOp::Rem)],
        ];
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut left = self.binary(level + 1)?;
        while let Some(p) = self.peek_punct() {
            let Some(&(_, op)) = LEVELS[level].iter().find(|(s, _)| *s == p) else {
                break;
            };
            self.pos += 1;
            let right = self.binary(level + 1)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        let op = match self.peek_punct() {
            Some("!") => UnOp::Not,
            Some("-") => UnOp::Neg,
            Some("+") => UnOp::Plus,
            _ => return self.postfix(),
        };
        self.pos += 1;
        self.enter()?;
        let operand = self.unary();
        self.depth -= 1;
        Ok(Expr::Unary(op, Box::new(operand?)))
    }

    fn segments(&mut self) -> Result<Vec<Segment>, ExprError> {
        let mut segments = Vec::new();
        loop {
            match self.peek_punct() {
                Some(".") => {
                    self.pos += 1;
                    match self.peek().map(|t| t.kind.clone()) {
                        Some(TokenKind::Ident(name)) => {
                            self.pos += 1;
                            segments.push(Segment::Key(name));
                        }
                        Some(TokenKind::Number(n)) if n.fract() == 0.0 && n >= 0.0 => {
                            self.pos += 1;
                            segments.push(Segment::Key(format!("{}", n as u64)));
                        }
                        _ => return self.unexpected(),
                    }
                }
                Some("[") => {
                    self.pos += 1;
                    let index = self.expression()?;
                    self.expect("]")?;
                    segments.push(match index {
                        Expr::Literal(Value::String(s)) => Segment::Key(s),
                        other => Segment::Computed(Box::new(other)),
                    });
                }
                _ => return Ok(segments),
            }
        }
    }

    fn postfix(&mut self) -> Result<Expr, ExprError> {
        let Some(token) = self.peek().cloned() else {
            return self.unexpected();
        };
        let primary = match token.kind {
            TokenKind::Number(n) => {
                self.pos += 1;
                Expr::Literal(number(n))
            }
            TokenKind::Str(s) => {
                self.pos += 1;
                Expr::Literal(Value::String(s))
            }
            TokenKind::Ident(name) => {
                self.pos += 1;
                match name.as_str() {
                    "true" => Expr::Literal(Value::Bool(true)),
                    "false" => Expr::Literal(Value::Bool(false)),
                    "null" => Expr::Literal(Value::Null),
                    "undefined" => Expr::Undefined,
                    _ => {
                        let segments = self.segments()?;
                        let path = if self.peek_punct() == Some("(") {
                            self.call(Expr::Path {
                                root: name,
                                segments,
                            })?
                        } else {
                            path_expr(name, segments)
                        };
                        return self.calls_after(path);
                    }
                }
            }
            TokenKind::Punct("(") => {
                self.pos += 1;
                let inner = self.expression()?;
                self.expect(")")?;
                inner
            }
            TokenKind::Punct("[") => {
                self.pos += 1;
                self.enter()?;
                let mut items = Vec::new();
                while self.peek_punct() != Some("]") {
                    items.push(self.expression()?);
                    if self.peek_punct() != Some("]") {
                        self.expect(",")?;
                    }
                }
                self.expect("]")?;
                self.depth -= 1;
                Expr::Array(items)
            }
            TokenKind::Punct("{") => {
                self.pos += 1;
                self.enter()?;
                let mut fields = Vec::new();
                while self.peek_punct() != Some("}") {
                    let key = match self.peek().map(|t| t.kind.clone()) {
                        Some(TokenKind::Ident(k)) | Some(TokenKind::Str(k)) => k,
                        Some(TokenKind::Number(n)) => format_number(n),
                        _ => return self.unexpected(),
                    };
                    self.pos += 1;
                    self.expect(":")?;
                    fields.push((key, self.expression()?));
                    if self.peek_punct() != Some("}") {
                        self.expect(",")?;
                    }
                }
                self.expect("}")?;
                self.depth -= 1;
                Expr::Object(fields)
            }
            _ => return self.unexpected(),
        };
        self.calls_after(primary)
    }

    /// Member accesses and calls after `expr`: `x.a[0].trim().length`.
    fn calls_after(&mut self, mut expr: Expr) -> Result<Expr, ExprError> {
        loop {
            let segments = self.segments()?;
            if !segments.is_empty() {
                expr = Expr::Member {
                    base: Box::new(expr),
                    segments,
                };
            }
            if self.peek_punct() != Some("(") {
                return Ok(expr);
            }
            if !matches!(expr, Expr::Member { .. }) {
                return self.error("only the methods and functions of the table can be called");
            }
            expr = self.call(expr)?;
        }
    }
}

/// Builds a path; a hyphenated root also gets the subtraction it reads as otherwise.
fn path_expr(root: String, segments: Vec<Segment>) -> Expr {
    if !root.contains('-') {
        return Expr::Path { root, segments };
    }
    let parts: Vec<&str> = root.split('-').collect();
    let operand = |part: &str, segments: Vec<Segment>| -> Expr {
        if part.chars().next().is_some_and(is_ident_start) {
            Expr::Path {
                root: part.to_string(),
                segments,
            }
        } else {
            match part.parse::<f64>() {
                Ok(n) if segments.is_empty() => Expr::Literal(number(n)),
                _ => Expr::Literal(Value::Null),
            }
        }
    };
    let last = parts.len() - 1;
    let mut fallback = operand(parts[0], Vec::new());
    for (i, part) in parts.iter().enumerate().skip(1) {
        let segs = if i == last {
            segments.clone()
        } else {
            Vec::new()
        };
        fallback = Expr::Binary(
            BinOp::Sub,
            Box::new(fallback),
            Box::new(operand(part, segs)),
        );
    }
    Expr::Hyphenated {
        path: Box::new(Expr::Path { root, segments }),
        fallback: Box::new(fallback),
    }
}

/// Depth of the syntax tree, computed without recursion.
fn tree_depth(root: &Expr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        if d > MAX_TREE_DEPTH {
            break;
        }
        match e {
            Expr::Literal(_) => {}
            Expr::Path { segments, .. } => {
                for s in segments {
                    if let Segment::Computed(x) = s {
                        stack.push((x, d + 1));
                    }
                }
            }
            Expr::Member { base, segments } => {
                stack.push((base, d + 1));
                for s in segments {
                    if let Segment::Computed(x) = s {
                        stack.push((x, d + 1));
                    }
                }
            }
            Expr::Hyphenated { path, fallback } => {
                stack.push((path, d + 1));
                stack.push((fallback, d + 1));
            }
            Expr::Array(items) => stack.extend(items.iter().map(|x| (x, d + 1))),
            Expr::Object(fields) => stack.extend(fields.iter().map(|(_, x)| (x, d + 1))),
            Expr::Unary(_, x) => stack.push((x, d + 1)),
            Expr::Binary(_, l, r) => {
                stack.push((l, d + 1));
                stack.push((r, d + 1));
            }
            Expr::Conditional(c, t, o) => {
                stack.push((c, d + 1));
                stack.push((t, d + 1));
                stack.push((o, d + 1));
            }
            Expr::Undefined => {}
            Expr::Method { target, args, .. } => {
                stack.push((target, d + 1));
                stack.extend(args.iter().map(|x| (x, d + 1)));
            }
            Expr::Function(_, args) => stack.extend(args.iter().map(|x| (x, d + 1))),
        }
    }
    deepest
}

// ---------------------------------------------------------------------------------------
// Evaluation

type Val<'a> = Cow<'a, Value>;

/// JavaScript's `undefined`: `null` in JSON, told apart by its address (it compares false
/// with everything, where `null` compares as 0).
static UNDEFINED: Value = Value::Null;
/// JavaScript's `NaN`, likewise: `null` in JSON, never equal, never ordered.
static NAN: Value = Value::Null;

fn undefined<'a>() -> Val<'a> {
    Cow::Borrowed(&UNDEFINED)
}

fn is_undefined(v: &Value) -> bool {
    std::ptr::eq(v, &UNDEFINED)
}

fn is_nan(v: &Value) -> bool {
    std::ptr::eq(v, &NAN) || v.as_f64().is_some_and(f64::is_nan)
}

/// `f` as a value: `NaN` stays recognisable, so that it compares false.
fn numeric<'a>(f: f64) -> Val<'a> {
    if f.is_nan() {
        Cow::Borrowed(&NAN)
    } else {
        Cow::Owned(number(f))
    }
}

thread_local! {
    /// Set when the evaluation hit what JavaScript throws on (a member of `undefined` or
    /// `null`): the whole expression is then `undefined`.
    static THREW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn throw() {
    THREW.with(|t| t.set(true));
}

/// Runs an evaluation; `None` if it threw.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    let outer = THREW.with(|t| t.replace(false));
    let value = f();
    let threw = THREW.with(|t| t.replace(outer));
    (!threw).then_some(value)
}

fn eval<'a>(e: &'a Expr, scope: &'a dyn Scope) -> Val<'a> {
    match e {
        Expr::Literal(v) => Cow::Borrowed(v),
        Expr::Undefined => undefined(),
        Expr::Path { root, segments } => {
            resolve_path(root, segments, scope).unwrap_or_else(undefined)
        }
        Expr::Hyphenated { path, fallback } => {
            if let Expr::Path { root, segments } = path.as_ref() {
                if lookup_root(root, segments, scope).is_some() {
                    return resolve_path(root, segments, scope).unwrap_or_else(undefined);
                }
            }
            eval(fallback, scope)
        }
        Expr::Member { base, segments } => {
            let mut current = eval(base, scope);
            for (i, s) in segments.iter().enumerate() {
                current = match step_value(current, s, scope) {
                    Some(v) => v,
                    None => {
                        if i + 1 < segments.len() {
                            throw();
                        }
                        return undefined();
                    }
                };
            }
            current
        }
        Expr::Conditional(c, t, o) => {
            if truthy(&eval(c, scope)) {
                eval(t, scope)
            } else {
                eval(o, scope)
            }
        }
        Expr::Method {
            target,
            method,
            args,
        } => {
            let target = eval(target, scope);
            let args: Vec<Val> = args.iter().map(|a| eval(a, scope)).collect();
            call_method(&target, *method, &args)
        }
        Expr::Function(function, args) => {
            let args: Vec<Val> = args.iter().map(|a| eval(a, scope)).collect();
            call_function(*function, &args)
        }
        Expr::Array(items) => Cow::Owned(Value::Array(
            items.iter().map(|x| eval(x, scope).into_owned()).collect(),
        )),
        // A member whose value is undefined is left out, as JSON.stringify does, so a
        // stored object does not turn undefined into null.
        Expr::Object(fields) => Cow::Owned(Value::Object(
            fields
                .iter()
                .filter_map(|(k, x)| {
                    let v = eval(x, scope);
                    (!is_undefined(&v)).then(|| (k.clone(), v.into_owned()))
                })
                .collect(),
        )),
        Expr::Unary(op, x) => {
            let v = eval(x, scope);
            match op {
                UnOp::Not => Cow::Owned(Value::Bool(!truthy(&v))),
                UnOp::Neg => numeric(-to_number(&v)),
                UnOp::Plus => numeric(to_number(&v)),
            }
        }
        Expr::Binary(op, l, r) => eval_binary(*op, l, r, scope),
    }
}

/// Finds the root value: the name itself, or the shortest dotted flat key that exists.
/// Returns the value and how many leading segments the root consumed.
fn lookup_root<'a>(
    root: &str,
    segments: &[Segment],
    scope: &'a dyn Scope,
) -> Option<(&'a Value, usize)> {
    let deferred = scope.defers(root);
    if !deferred {
        if let Some(v) = scope.lookup(root) {
            return Some((v, 0));
        }
    }
    let mut key = root.to_string();
    for (i, s) in segments.iter().enumerate() {
        let Segment::Key(k) = s else { break };
        key.push('.');
        key.push_str(k);
        if let Some(v) = scope.lookup(&key) {
            return Some((v, i + 1));
        }
    }
    if deferred && segments.is_empty() {
        // The name itself, whole: only when nothing narrower was asked for.
        return scope.lookup(root).map(|v| (v, 0));
    }
    None
}

fn resolve_path<'a>(root: &str, segments: &'a [Segment], scope: &'a dyn Scope) -> Option<Val<'a>> {
    // A name that is not in scope at all is undefined, members and all: a run's context
    // keys are flat (`_outputs.n1` is one name), so `_outputs.n1.total ?? 0` must not throw
    // before `_outputs.n1` exists.
    let (mut current, used) = match segments.first() {
        // `context['_outputs.n1']` on a deferred name reads that key alone.
        Some(Segment::Computed(x)) if scope.defers(root) => {
            let key = eval(x, scope);
            let key = key.as_str()?;
            (scope.lookup(&format!("{root}.{key}"))?, 1)
        }
        _ => lookup_root(root, segments, scope)?,
    };
    let rest = &segments[used..];
    for (i, s) in rest.iter().enumerate() {
        if current.is_null() {
            // A member of `null`.
            throw();
            return None;
        }
        let last = i + 1 == rest.len();
        let step = match s {
            Segment::Key(k) if k == "length" && (current.is_array() || current.is_string()) => {
                // A length is a number: nothing can follow it.
                return if i + 1 == rest.len() {
                    length_of(current).map(Cow::Owned)
                } else {
                    None
                };
            }
            Segment::Key(k) => step_key(current, k),
            Segment::Computed(x) => {
                let index = eval(x, scope);
                step_index(current, &index)
            }
        };
        current = match step {
            Some(v) => v,
            None => {
                if !last {
                    // The next member would be read from `undefined`.
                    throw();
                }
                return None;
            }
        };
    }
    Some(Cow::Borrowed(current))
}

fn step_key<'v>(value: &'v Value, key: &str) -> Option<&'v Value> {
    match value {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    }
}

fn step_index<'v>(value: &'v Value, index: &Value) -> Option<&'v Value> {
    match index {
        Value::String(k) => step_key(value, k),
        Value::Number(n) => {
            let f = n.as_f64()?;
            if f < 0.0 || f.fract() != 0.0 {
                return None;
            }
            match value {
                Value::Array(a) => a.get(f as usize),
                Value::Object(m) => m.get(&format_number(f)),
                _ => None,
            }
        }
        _ => None,
    }
}

fn length_of(value: &Value) -> Option<Value> {
    match value {
        Value::Array(a) => Some(Value::from(a.len())),
        Value::String(s) => Some(Value::from(s.encode_utf16().count())),
        _ => None,
    }
}

fn step_value<'a>(current: Val<'a>, segment: &'a Segment, scope: &'a dyn Scope) -> Option<Val<'a>> {
    let key_owned;
    let key: &Value = match segment {
        Segment::Key(k) => {
            key_owned = Value::String(k.clone());
            &key_owned
        }
        Segment::Computed(x) => {
            key_owned = eval(x, scope).into_owned();
            &key_owned
        }
    };
    if current.is_null() {
        // A member of `undefined` or `null`.
        throw();
        return None;
    }
    if key.as_str() == Some("length") && !current.is_object() {
        return length_of(&current).map(Cow::Owned);
    }
    match current {
        Cow::Borrowed(v) => step_index(v, key).map(Cow::Borrowed),
        Cow::Owned(v) => step_index(&v, key).cloned().map(Cow::Owned),
    }
}

fn eval_binary<'a>(op: BinOp, l: &'a Expr, r: &'a Expr, scope: &'a dyn Scope) -> Val<'a> {
    match op {
        BinOp::And => {
            let left = eval(l, scope);
            return if truthy(&left) { eval(r, scope) } else { left };
        }
        BinOp::Or => {
            let left = eval(l, scope);
            return if truthy(&left) { left } else { eval(r, scope) };
        }
        BinOp::Nullish => {
            let left = eval(l, scope);
            return if left.is_null() { eval(r, scope) } else { left };
        }
        _ => {}
    }
    let a = eval(l, scope);
    let b = eval(r, scope);
    let (a, b) = (a.as_ref(), b.as_ref());
    match op {
        BinOp::Add if !(is_stringish(a) || is_stringish(b)) => {
            return numeric(to_number(a) + to_number(b))
        }
        BinOp::Sub => return numeric(to_number(a) - to_number(b)),
        BinOp::Mul => return numeric(to_number(a) * to_number(b)),
        BinOp::Div => return numeric(to_number(a) / to_number(b)),
        BinOp::Rem => return numeric(to_number(a) % to_number(b)),
        _ => {}
    }
    Cow::Owned(match op {
        BinOp::Add => Value::String(to_js_string(a) + &to_js_string(b)),
        BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => Value::Null,
        BinOp::Lt => Value::Bool(compare(a, b).is_some_and(|o| o.is_lt())),
        BinOp::Le => Value::Bool(compare(a, b).is_some_and(|o| o.is_le())),
        BinOp::Gt => Value::Bool(compare(a, b).is_some_and(|o| o.is_gt())),
        BinOp::Ge => Value::Bool(compare(a, b).is_some_and(|o| o.is_ge())),
        BinOp::LooseEq => Value::Bool(loose_eq(a, b)),
        BinOp::LooseNe => Value::Bool(!loose_eq(a, b)),
        BinOp::StrictEq => Value::Bool(strict_eq(a, b)),
        BinOp::StrictNe => Value::Bool(!strict_eq(a, b)),
        BinOp::And | BinOp::Or | BinOp::Nullish => Value::Null,
    })
}

fn is_stringish(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Array(_) | Value::Object(_))
}

/// A number as JSON: integral values that fit are integers; non-finite values are null.
fn number(f: f64) -> Value {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
        Value::Number(Number::from(f as i64))
    } else {
        Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn format_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

/// JavaScript `Number(v)`.
fn to_number(v: &Value) -> f64 {
    if is_undefined(v) || is_nan(v) {
        return f64::NAN;
    }
    match v {
        Value::Null => 0.0,
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() {
                0.0
            } else {
                t.parse::<f64>().unwrap_or(f64::NAN)
            }
        }
        Value::Array(a) if a.is_empty() => 0.0,
        Value::Array(a) if a.len() == 1 => to_number(&a[0]),
        _ => f64::NAN,
    }
}

/// JavaScript `String(v)`.
fn to_js_string(v: &Value) -> String {
    if is_undefined(v) {
        return "undefined".into();
    }
    if is_nan(v) {
        return "NaN".into();
    }
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.as_f64().map(format_number).unwrap_or_default(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                if x.is_null() {
                    String::new()
                } else {
                    to_js_string(x)
                }
            })
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(_) => "[object Object]".into(),
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    if let (Value::String(x), Value::String(y)) = (a, b) {
        return Some(x.cmp(y));
    }
    to_number(a).partial_cmp(&to_number(b))
}

fn strict_eq(a: &Value, b: &Value) -> bool {
    if is_nan(a) || is_nan(b) {
        return false;
    }
    if is_undefined(a) != is_undefined(b) {
        return false;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn loose_eq(a: &Value, b: &Value) -> bool {
    if is_nan(a) || is_nan(b) {
        return false;
    }
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::Number(_), Value::String(_)) | (Value::String(_), Value::Number(_)) => {
            to_number(a) == to_number(b)
        }
        (Value::Bool(_), _) => loose_eq(&number(to_number(a)), b),
        (_, Value::Bool(_)) => loose_eq(a, &number(to_number(b))),
        _ => strict_eq(a, b),
    }
}

/// A method of the table on `target`. On `undefined` or `null` it throws, as in JavaScript;
/// on a value of another type it yields `undefined`.
fn call_method<'a>(target: &Value, method: Method, args: &[Val<'a>]) -> Val<'a> {
    if target.is_null() {
        throw();
        return undefined();
    }
    let arg = |i: usize| args.get(i).map(|a| a.as_ref());
    let text = |i: usize| {
        arg(i)
            .map(to_js_string)
            .unwrap_or_else(|| "undefined".into())
    };
    match (target, method) {
        (Value::String(s), Method::Includes) => Cow::Owned(Value::Bool(s.contains(&text(0)))),
        (Value::String(s), Method::StartsWith) => Cow::Owned(Value::Bool(s.starts_with(&text(0)))),
        (Value::String(s), Method::EndsWith) => Cow::Owned(Value::Bool(s.ends_with(&text(0)))),
        (Value::String(s), Method::IndexOf) => {
            let at = s
                .find(&text(0))
                .map_or(-1.0, |byte| s[..byte].encode_utf16().count() as f64);
            numeric(at)
        }
        (Value::String(s), Method::ToLowerCase) => Cow::Owned(Value::String(s.to_lowercase())),
        (Value::String(s), Method::ToUpperCase) => Cow::Owned(Value::String(s.to_uppercase())),
        (Value::String(s), Method::Trim) => Cow::Owned(Value::String(s.trim().to_string())),
        (Value::String(s), Method::Slice) => {
            let units: Vec<u16> = s.encode_utf16().collect();
            let (from, to) = slice_bounds(units.len(), arg(0), arg(1));
            Cow::Owned(Value::String(String::from_utf16_lossy(&units[from..to])))
        }
        (Value::Array(items), Method::Includes) => {
            let x = arg(0).unwrap_or(&UNDEFINED);
            Cow::Owned(Value::Bool(items.iter().any(|i| same_value_zero(i, x))))
        }
        (Value::Array(items), Method::IndexOf) => {
            let x = arg(0).unwrap_or(&UNDEFINED);
            numeric(
                items
                    .iter()
                    .position(|i| strict_eq(i, x))
                    .map_or(-1.0, |i| i as f64),
            )
        }
        (Value::Array(items), Method::Slice) => {
            let (from, to) = slice_bounds(items.len(), arg(0), arg(1));
            Cow::Owned(Value::Array(items[from..to].to_vec()))
        }
        // Not a function of that value: a TypeError in JavaScript.
        _ => {
            throw();
            undefined()
        }
    }
}

/// `includes` equality: strict, but `NaN` equals `NaN`.
fn same_value_zero(a: &Value, b: &Value) -> bool {
    (is_nan(a) && is_nan(b)) || strict_eq(a, b)
}

/// `slice(start, end)` bounds over `len` items: negative counts from the end, missing end
/// is the end, and the result is never reversed.
fn slice_bounds(len: usize, start: Option<&Value>, end: Option<&Value>) -> (usize, usize) {
    let bound = |v: Option<&Value>, default: usize| -> usize {
        let Some(v) = v.filter(|v| !is_undefined(v)) else {
            return default;
        };
        let f = to_number(v);
        let f = if f.is_nan() { 0.0 } else { f.trunc() };
        if f < 0.0 {
            len.saturating_sub((-f).min(len as f64) as usize)
        } else {
            (f.min(len as f64)) as usize
        }
    };
    let from = bound(start, 0);
    let to = bound(end, len).max(from);
    (from, to)
}

/// A function of the table.
fn call_function<'a>(function: Function, args: &[Val<'a>]) -> Val<'a> {
    let first = || args.first().map_or(f64::NAN, |a| to_number(a));
    match function {
        Function::Min => numeric(
            args.iter()
                .map(|a| to_number(a))
                .fold(f64::INFINITY, |m, x| {
                    if x.is_nan() || m.is_nan() {
                        f64::NAN
                    } else {
                        m.min(x)
                    }
                }),
        ),
        Function::Max => numeric(args.iter().map(|a| to_number(a)).fold(
            f64::NEG_INFINITY,
            |m, x| {
                if x.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(x)
                }
            },
        )),
        Function::Round => numeric((first() + 0.5).floor()),
        Function::Floor => numeric(first().floor()),
        Function::Ceil => numeric(first().ceil()),
        Function::Abs => numeric(first().abs()),
        Function::IsArray => Cow::Owned(Value::Bool(args.first().is_some_and(|a| a.is_array()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(src: &str, scope: Value) -> Value {
        Expression::parse(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .evaluate(&scope)
    }

    #[test]
    fn paths_and_conditions() {
        let s = json!({"result": {"output": {"total": 150, "items": [1, 2, 3]}}});
        assert_eq!(ev("result.output.total > 100", s.clone()), json!(true));
        assert_eq!(ev("result.output.items[1]", s.clone()), json!(2));
        assert_eq!(ev("result.output.items.length", s.clone()), json!(3));
        assert_eq!(
            ev(
                "result.output.items[result.output.items.length - 1]",
                s.clone()
            ),
            json!(3)
        );
        assert_eq!(ev("result.missing.deeper", s), Value::Null);
    }

    #[test]
    fn bracket_keys_and_hyphens() {
        let s =
            json!({"a": {"key-with-dash": 5}, "fetch-user": {"name": "ann"}, "a1": 10, "b1": 3});
        assert_eq!(ev("a[\"key-with-dash\"]", s.clone()), json!(5));
        assert_eq!(ev("a['key-with-dash'] + 1", s.clone()), json!(6));
        assert_eq!(ev("fetch-user.name", s.clone()), json!("ann"));
        assert_eq!(ev("a1-b1", s.clone()), json!(7));
        assert_eq!(ev("a1 - b1", s), json!(7));
    }

    #[test]
    fn flat_keys_are_found() {
        let s = json!({"_outputs.n1": {"total": 4}, "_outputs.fetch-user": {"id": 9}});
        assert_eq!(ev("_outputs.n1", s.clone()), json!({"total": 4}));
        assert_eq!(ev("_outputs.n1.total * 2", s.clone()), json!(8));
        assert_eq!(ev("_outputs.fetch-user.id", s.clone()), json!(9));
        assert_eq!(ev("_outputs.n2", s), Value::Null);
    }

    #[test]
    fn logic_returns_operands() {
        let s = json!({"x": null, "y": 0, "name": "bo"});
        assert_eq!(ev("x ?? 'd'", s.clone()), json!("d"));
        assert_eq!(ev("y ?? 'd'", s.clone()), json!(0));
        assert_eq!(ev("y || 'default'", s.clone()), json!("default"));
        assert_eq!(ev("name && 'yes'", s.clone()), json!("yes"));
        assert_eq!(ev("!name", s.clone()), json!(false));
        assert_eq!(ev("!!missing", s), json!(false));
    }

    #[test]
    fn equality_follows_javascript() {
        let s = json!({});
        assert_eq!(ev("5 == '5'", s.clone()), json!(true));
        assert_eq!(ev("5 === '5'", s.clone()), json!(false));
        assert_eq!(ev("null == undefined", s.clone()), json!(true));
        assert_eq!(ev("missing == null", s.clone()), json!(true));
        assert_eq!(ev("0 == null", s.clone()), json!(false));
        assert_eq!(ev("true == 1", s.clone()), json!(true));
        assert_eq!(ev("1.0 === 1", s.clone()), json!(true));
        assert_eq!(ev("'a' !== 'b'", s), json!(true));
    }

    #[test]
    fn comparison_and_arithmetic() {
        let s = json!({"n": "12", "t": "abc"});
        assert_eq!(ev("'abc' < 'abd'", s.clone()), json!(true));
        assert_eq!(ev("n > 9", s.clone()), json!(true));
        assert_eq!(ev("t > 1", s.clone()), json!(false));
        assert_eq!(ev("t <= 1", s.clone()), json!(false));
        assert_eq!(ev("1 + 1", s.clone()), json!(2));
        assert_eq!(ev("7 / 2", s.clone()), json!(3.5));
        assert_eq!(ev("7 % 4 * 2", s.clone()), json!(6));
        assert_eq!(ev("-(2 + 3)", s.clone()), json!(-5));
        assert_eq!(ev("1 / 0", s.clone()), Value::Null);
        assert_eq!(ev("'n=' + 1.5", s.clone()), json!("n=1.5"));
        assert_eq!(ev("1 + 2 + 'x'", s.clone()), json!("3x"));
        assert_eq!(ev("'' + true + null", s.clone()), json!("truenull"));
        assert_eq!(ev("2 + 3 * 4 > 13 && (1 < 2)", s), json!(true));
    }

    #[test]
    fn array_and_object_literals() {
        let s = json!({"a": 2});
        assert_eq!(ev("[1, a, 'x']", s.clone()), json!([1, 2, "x"]));
        assert_eq!(
            ev("{total: a * 10, 'k-2': [a], n: null}", s.clone()),
            json!({"total": 20, "k-2": [2], "n": null})
        );
        assert_eq!(ev("[]", s.clone()), json!([]));
        assert_eq!(ev("{}.x", s.clone()), Value::Null);
        assert_eq!(ev("[5, 6][1]", s.clone()), json!(6));
        assert_eq!(ev("[1, 2, 3].length", s), json!(3));
        assert!(Expression::parse("[1, 2").is_err());
        assert!(Expression::parse("{a 1}").is_err());
    }

    #[test]
    fn truthiness() {
        for v in [json!(0), json!(""), json!(null), json!(false)] {
            assert!(!truthy(&v), "{v}");
        }
        for v in [json!(1), json!("0"), json!([]), json!({}), json!(true)] {
            assert!(truthy(&v), "{v}");
        }
    }

    #[test]
    fn ternaries_choose_lazily_and_nest_to_the_right() {
        let s = json!({"n": 5, "tier": "gold"});
        assert_eq!(ev("n > 3 ? 'big' : 'small'", s.clone()), json!("big"));
        assert_eq!(
            ev("n > 9 ? 'big' : n > 3 ? 'mid' : 'small'", s.clone()),
            json!("mid")
        );
        assert_eq!(ev("tier == 'gold' ? n * 2 : n", s.clone()), json!(10));
        assert_eq!(ev("(n ?? 0) ? {a: 1} : [1]", s), json!({"a": 1}));
    }

    #[test]
    fn the_table_of_methods_and_functions() {
        let s = json!({"name": "  Ada Lovelace ", "tags": ["x", "y"], "n": -2.5, "e": "é€"});
        assert_eq!(
            ev("name.trim().toLowerCase()", s.clone()),
            json!("ada lovelace")
        );
        assert_eq!(ev("name.includes('Love')", s.clone()), json!(true));
        assert_eq!(ev("name.trim().startsWith('Ada')", s.clone()), json!(true));
        assert_eq!(ev("name.endsWith('x')", s.clone()), json!(false));
        assert_eq!(ev("name.indexOf('Ada')", s.clone()), json!(2));
        assert_eq!(ev("name.toUpperCase().length", s.clone()), json!(15));
        assert_eq!(ev("name.trim().slice(0, 3)", s.clone()), json!("Ada"));
        assert_eq!(ev("name.trim().slice(-8)", s.clone()), json!("Lovelace"));
        assert_eq!(ev("e.slice(1)", s.clone()), json!("€"));
        assert_eq!(ev("tags.includes('y')", s.clone()), json!(true));
        assert_eq!(ev("tags.indexOf('z')", s.clone()), json!(-1));
        assert_eq!(ev("tags.slice(1)", s.clone()), json!(["y"]));
        assert_eq!(ev("Math.max(1, n, 3)", s.clone()), json!(3));
        assert_eq!(ev("Math.min(1, n, 3)", s.clone()), json!(-2.5));
        assert_eq!(ev("Math.round(n)", s.clone()), json!(-2));
        assert_eq!(ev("Math.floor(n)", s.clone()), json!(-3));
        assert_eq!(ev("Math.ceil(n)", s.clone()), json!(-2));
        assert_eq!(ev("Math.abs(n)", s.clone()), json!(2.5));
        assert_eq!(
            ev("Array.isArray(tags) && !Array.isArray(name)", s.clone()),
            json!(true)
        );
        // A method of another type's value, or of nothing, throws: the whole expression
        // is undefined.
        assert_eq!(ev("n.includes(1)", s.clone()), Value::Null);
        assert!(!Expression::parse("n.includes(1) || true")
            .unwrap()
            .evaluate_bool(&s));
        // An object drops its undefined members, as JSON.stringify does.
        assert_eq!(ev("{a: missing, b: 1}", s.clone()), json!({"b": 1}));
        assert!(!Expression::parse("missing.includes('a') || true")
            .unwrap()
            .evaluate_bool(&s));
    }

    #[test]
    fn undefined_compares_false_and_a_member_of_it_makes_the_whole_expression_false() {
        let s = json!({"fetch": {"total": 150}, "nothing": null});
        let holds = |src: &str| Expression::parse(src).unwrap().evaluate_bool(&s);
        // A missing member is undefined: neither side of a comparison holds.
        assert!(!holds("fetch.count > 100"));
        assert!(!holds("fetch.count <= 100"));
        assert!(!holds("missing <= 100"));
        assert!(holds("fetch.count === undefined && fetch.count == null"));
        assert!(!holds("fetch.count === null"));
        // null compares as 0, as in JavaScript.
        assert!(holds("nothing <= 100"));
        // A member of undefined or null throws: the whole condition is false. (A name not in
        // scope at all is undefined with its members: context keys are flat names.)
        assert!(holds("!missing.total"));
        assert!(holds("(_outputs.n1.total ?? 0) < 3"));
        assert!(!holds("!fetch.count.value"));
        assert!(!holds("!nothing.value"));
        assert!(!holds("fetch.count.value > 1 || true"));
        // NaN is never equal nor ordered.
        assert!(!holds("(fetch.count + 1) >= 0"));
        assert!(!holds("(fetch.count * 1) == (fetch.count * 1)"));
        assert_eq!(ev("'a' + missing", s.clone()), json!("aundefined"));
        assert_eq!(ev("missing ?? 5", s), json!(5));
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "a(",
            "1 +",
            "a = 1",
            "a;",
            "f(1)",
            "(1",
            "a.",
            "'open",
            "#",
            "a[1",
            "a.push(1)",
            "Math.random()",
            "x ? 1",
            "constructor.constructor('x')()",
            "s.startsWith('b', 1)",
            "Math.abs()",
            "s.trim(1)",
            "s.slice(1, 2, 3)",
        ] {
            assert!(Expression::parse(bad).is_err(), "{bad} should not parse");
        }
        let long = "1+".repeat(MAX_SOURCE_LEN) + "1";
        assert!(Expression::parse(&long).is_err());
        let nested = "(".repeat(10_000) + "1" + &")".repeat(10_000);
        assert!(Expression::parse(&nested).is_err());
        let chain = "1+".repeat(1000) + "1";
        assert!(Expression::parse(&chain)
            .unwrap_err()
            .message
            .contains("deeper"));
        let e = Expression::parse("1 +").unwrap_err();
        assert!(e.to_string().contains("column"), "{e}");
        assert_eq!(evaluate("((", &json!({})), Value::Null);
    }

    #[test]
    fn scopes_from_maps() {
        let mut m = Map::new();
        m.insert("k".into(), json!(3));
        assert_eq!(Expression::parse("k * 2").unwrap().evaluate(&m), json!(6));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i32>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)),
                "[a-z-]{0,6}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn token_soup() -> impl Strategy<Value = String> {
            let token = prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just("a-b".to_string()),
                Just("ab".to_string()),
                Just("_outputs.a".to_string()),
                Just("length".to_string()),
                Just("1".to_string()),
                Just("2.5".to_string()),
                Just("'s'".to_string()),
                Just("null".to_string()),
                Just("true".to_string()),
                Just(".".to_string()),
                Just("[".to_string()),
                Just("]".to_string()),
                Just("(".to_string()),
                Just(")".to_string()),
                Just("{".to_string()),
                Just("}".to_string()),
                Just(",".to_string()),
                Just(":".to_string()),
                Just("!".to_string()),
                Just("-".to_string()),
                Just("+".to_string()),
                Just("*".to_string()),
                Just("/".to_string()),
                Just("%".to_string()),
                Just("<".to_string()),
                Just(">=".to_string()),
                Just("==".to_string()),
                Just("!==".to_string()),
                Just("&&".to_string()),
                Just("||".to_string()),
                Just("??".to_string()),
                Just(" ".to_string()),
            ];
            prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
        }

        proptest! {
            #[test]
            fn arbitrary_strings_never_panic(src in ".{0,80}", scope in json_value()) {
                if let Ok(e) = Expression::parse(&src) {
                    let _ = e.evaluate(&scope);
                }
                let _ = evaluate(&src, &scope);
            }

            #[test]
            fn token_soup_never_panics(src in token_soup(), scope in json_value()) {
                let parsed = Expression::parse(&src);
                if let Ok(e) = parsed {
                    let v = e.evaluate(&scope);
                    // Evaluation is deterministic.
                    prop_assert_eq!(v, e.evaluate(&scope));
                }
            }

            #[test]
            fn evaluation_over_random_scopes_never_panics(scope in json_value()) {
                for src in ["a.b", "a[0].c", "a == b", "a + b", "a < b", "a.length", "a ?? b", "!a || b", "a-b", "-a % b"] {
                    let e = Expression::parse(src).unwrap();
                    let _ = e.evaluate(&scope);
                    let _ = e.evaluate_bool(&scope);
                }
            }
        }
    }
}
