//! Query parameters from Python: each value is read once (with the GIL) into a [`Value`],
//! then encoded for the type the server inferred for its `$n`, as asyncpg does. A value
//! that does not fit its parameter's type is an error naming both, never a panic.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use chrono::NaiveDate;
use pgengine::query::Param;
use pgengine::types::{IsNull, Kind, ToSql, Type, to_sql_checked};
use postgres_protocol::types as wire;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDate, PyDateAccess, PyDateTime, PyDelta, PyDeltaAccess, PyDict,
    PyFloat, PyInt, PyList, PyString, PyTime, PyTimeAccess, PyTuple,
};

use crate::numeric;
use crate::{decimal_class, uuid_class};

type BoxError = Box<dyn Error + Sync + Send>;

/// Microseconds in a day.
const DAY_MICROS: i64 = 86_400_000_000;

/// A Python value, read and ready to be encoded for whatever type its parameter has.
///
/// ```ignore
/// let params = params::from_sequence(&args)?;   // a Python list or tuple
/// ```
#[derive(Debug)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// An int beyond 64 bits, as decimal text (fits `numeric`).
    BigInt(String),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// A `decimal.Decimal`, as its text.
    Decimal(String),
    /// Days since 2000-01-01; `i32::MAX`/`MIN` for `date.max`/`date.min` (infinity).
    Date(i32),
    /// Microseconds since 2000-01-01 00:00: UTC for an aware datetime, the wall clock
    /// for a naive one (taken as UTC for `timestamptz`).
    DateTime {
        micros: i64,
    },
    /// Microseconds since midnight, and the UTC offset in seconds when aware.
    Time {
        micros: i64,
        utc_offset: Option<i32>,
    },
    /// A `timedelta`: days and microseconds.
    Interval {
        days: i32,
        micros: i64,
    },
    Uuid([u8; 16]),
    /// A `list` or `tuple`: an array (nested lists are dimensions).
    Array(Vec<Value>),
    /// A `dict`, as JSON text.
    Json(String),
}

/// Reads every element of a Python sequence of query arguments.
pub fn from_sequence(args: &Bound<'_, PyAny>) -> PyResult<Vec<Param>> {
    args.try_iter()?
        .map(|arg| Ok(Box::new(Value::from_py(&arg?)?) as Param))
        .collect()
}

impl Value {
    /// Reads one Python value; an unsupported type is a `TypeError`.
    pub fn from_py(value: &Bound<'_, PyAny>) -> PyResult<Value> {
        let py = value.py();
        if value.is_none() {
            return Ok(Value::Null);
        }
        if let Ok(b) = value.cast::<PyBool>() {
            return Ok(Value::Bool(b.is_true()));
        }
        if value.is_instance_of::<PyInt>() {
            return Ok(match value.extract::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => Value::BigInt(value.str()?.to_string()),
            });
        }
        if let Ok(f) = value.cast::<PyFloat>() {
            return Ok(Value::Float(f.value()));
        }
        if let Ok(s) = value.cast::<PyString>() {
            return Ok(Value::Text(s.to_str()?.to_owned()));
        }
        if let Ok(b) = value.cast::<PyBytes>() {
            return Ok(Value::Bytes(b.as_bytes().to_vec()));
        }
        if let Ok(b) = value.cast::<PyByteArray>() {
            return Ok(Value::Bytes(b.to_vec()));
        }
        if let Ok(dt) = value.cast::<PyDateTime>() {
            return datetime(dt);
        }
        if let Ok(d) = value.cast::<PyDate>() {
            // date.max / date.min: infinity, as asyncpg sends them.
            return Ok(Value::Date(
                match (d.get_year(), d.get_month(), d.get_day()) {
                    (9999, 12, 31) => i32::MAX,
                    (1, 1, 1) => i32::MIN,
                    (year, month, day) => date_days(year, month, day),
                },
            ));
        }
        if let Ok(t) = value.cast::<PyTime>() {
            let micros = time_micros(
                t.get_hour(),
                t.get_minute(),
                t.get_second(),
                t.get_microsecond(),
            );
            let utc_offset = utc_offset_seconds(value)?;
            return Ok(Value::Time { micros, utc_offset });
        }
        if let Ok(d) = value.cast::<PyDelta>() {
            let micros = d.get_seconds() as i64 * 1_000_000 + d.get_microseconds() as i64;
            return Ok(Value::Interval {
                days: d.get_days(),
                micros,
            });
        }
        if value.is_instance(decimal_class(py)?.as_any())? {
            return Ok(Value::Decimal(value.str()?.to_string()));
        }
        if value.is_instance(uuid_class(py)?.as_any())? {
            let bytes: Vec<u8> = value.getattr("bytes")?.extract()?;
            let bytes: [u8; 16] = bytes
                .try_into()
                .map_err(|_| PyTypeError::new_err("a UUID has 16 bytes"))?;
            return Ok(Value::Uuid(bytes));
        }
        if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
            let items = value
                .try_iter()?
                .map(|item| Value::from_py(&item?))
                .collect::<PyResult<_>>()?;
            return Ok(Value::Array(items));
        }
        if value.is_instance_of::<PyDict>() {
            let json = py.import("json")?.call_method1("dumps", (value,))?;
            return Ok(Value::Json(json.extract()?));
        }
        Err(PyTypeError::new_err(format!(
            "cannot send a value of type {} as a query parameter",
            value.get_type().name()?
        )))
    }

    fn describe(&self) -> &'static str {
        match self {
            Value::Null => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Text(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Decimal(_) => "Decimal",
            Value::Date(_) => "date",
            Value::DateTime { .. } => "datetime",
            Value::Time { .. } => "time",
            Value::Interval { .. } => "timedelta",
            Value::Uuid(_) => "UUID",
            Value::Array(_) => "list",
            Value::Json(_) => "dict",
        }
    }
}

fn datetime(dt: &Bound<'_, PyDateTime>) -> PyResult<Value> {
    let (year, month, day) = (dt.get_year(), dt.get_month(), dt.get_day());
    let (hour, minute, second, micro) = (
        dt.get_hour(),
        dt.get_minute(),
        dt.get_second(),
        dt.get_microsecond(),
    );
    // datetime.max / datetime.min: infinity, as asyncpg sends them.
    if (year, month, day, hour, minute, second, micro) == (9999, 12, 31, 23, 59, 59, 999_999) {
        return Ok(Value::DateTime { micros: i64::MAX });
    }
    if (year, month, day, hour, minute, second, micro) == (1, 1, 1, 0, 0, 0, 0) {
        return Ok(Value::DateTime { micros: i64::MIN });
    }
    let wall =
        date_days(year, month, day) as i64 * DAY_MICROS + time_micros(hour, minute, second, micro);
    let offset = utc_offset_seconds(dt.as_any())?.unwrap_or(0);
    Ok(Value::DateTime {
        micros: wall - offset as i64 * 1_000_000,
    })
}

/// `value.utcoffset()` in seconds, `None` for a naive value.
fn utc_offset_seconds(value: &Bound<'_, PyAny>) -> PyResult<Option<i32>> {
    let offset = value.call_method0("utcoffset")?;
    if offset.is_none() {
        return Ok(None);
    }
    let offset = offset.cast::<PyDelta>()?;
    Ok(Some(offset.get_days() * 86_400 + offset.get_seconds()))
}

fn pg_epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).expect("a valid date")
}

/// Days since 2000-01-01.
fn date_days(year: i32, month: u8, day: u8) -> i32 {
    let date =
        NaiveDate::from_ymd_opt(year, month.into(), day.into()).expect("Python dates are valid");
    (date - pg_epoch()).num_days() as i32
}

fn time_micros(hour: u8, minute: u8, second: u8, micro: u32) -> i64 {
    ((hour as i64 * 60 + minute as i64) * 60 + second as i64) * 1_000_000 + micro as i64
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        if let Value::Null = self {
            return Ok(IsNull::Yes);
        }
        match ty.kind() {
            Kind::Domain(base) => return self.to_sql(base, out),
            Kind::Array(member) => return self.array_to_sql(ty, member, out),
            Kind::Enum(_) => {
                if let Value::Text(text) = self {
                    out.put_slice(text.as_bytes());
                    return Ok(IsNull::No);
                }
                return Err(self.mismatch(ty));
            }
            _ => {}
        }
        match (self, ty.name()) {
            (Value::Bool(b), "bool") => wire::bool_to_sql(*b, out),
            (Value::Int(i), "int2") => {
                wire::int2_to_sql(i16::try_from(*i).map_err(|_| out_of_range(*i, ty))?, out)
            }
            (Value::Int(i), "int4") => {
                wire::int4_to_sql(i32::try_from(*i).map_err(|_| out_of_range(*i, ty))?, out)
            }
            (Value::Int(i), "int8") => wire::int8_to_sql(*i, out),
            (Value::Int(i), "oid") => {
                wire::oid_to_sql(u32::try_from(*i).map_err(|_| out_of_range(*i, ty))?, out)
            }
            (Value::Int(i), "float4") => wire::float4_to_sql(*i as f32, out),
            (Value::Int(i), "float8") => wire::float8_to_sql(*i as f64, out),
            (Value::Int(i), "numeric") => numeric::encode(&i.to_string(), out)?,
            (Value::BigInt(text), "numeric") => numeric::encode(text, out)?,
            (Value::Float(f), "float4") => wire::float4_to_sql(*f as f32, out),
            (Value::Float(f), "float8") => wire::float8_to_sql(*f, out),
            (Value::Float(f), "numeric") => numeric::encode(&float_text(*f), out)?,
            (Value::Decimal(text), "numeric") => numeric::encode(text, out)?,
            (Value::Decimal(text), "float4" | "float8") => {
                let f: f64 = text
                    .parse()
                    .map_err(|_| format!("invalid number {text:?}"))?;
                if ty.name() == "float4" {
                    wire::float4_to_sql(f as f32, out)
                } else {
                    wire::float8_to_sql(f, out)
                }
            }
            (
                Value::Text(text),
                "text" | "varchar" | "bpchar" | "name" | "unknown" | "json" | "xml" | "citext"
                | "char",
            ) => out.put_slice(text.as_bytes()),
            (Value::Text(text) | Value::Json(text), "jsonb") => {
                out.put_u8(1);
                out.put_slice(text.as_bytes());
            }
            (Value::Json(text), "json" | "text") => out.put_slice(text.as_bytes()),
            (Value::Text(text), "uuid") => wire::uuid_to_sql(parse_uuid(text)?, out),
            (Value::Text(text), "numeric") => numeric::encode(text, out)?,
            (Value::Bytes(bytes), "bytea") => out.put_slice(bytes),
            (Value::Uuid(bytes), "uuid") => wire::uuid_to_sql(*bytes, out),
            (Value::Date(days), "date") => wire::date_to_sql(*days, out),
            (Value::DateTime { micros, .. }, "date") => {
                wire::date_to_sql(micros.div_euclid(DAY_MICROS) as i32, out)
            }
            (Value::DateTime { micros, .. }, "timestamp" | "timestamptz") => {
                wire::timestamp_to_sql(*micros, out)
            }
            (Value::Time { micros, .. }, "time") => wire::time_to_sql(*micros, out),
            (Value::Time { micros, utc_offset }, "timetz") => {
                out.put_i64(*micros);
                out.put_i32(-utc_offset.unwrap_or(0));
            }
            (Value::Interval { days, micros }, "interval") => {
                out.put_i64(*micros);
                out.put_i32(*days);
                out.put_i32(0);
            }
            _ => return Err(self.mismatch(ty)),
        }
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true // checked per value in to_sql, where the value is known
    }

    to_sql_checked!();
}

impl Value {
    fn mismatch(&self, ty: &Type) -> BoxError {
        format!(
            "invalid input for a parameter of type {}: a Python {} cannot be sent as it",
            ty.name(),
            self.describe()
        )
        .into()
    }

    fn array_to_sql(
        &self,
        ty: &Type,
        member: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, BoxError> {
        let Value::Array(items) = self else {
            return Err(self.mismatch(ty));
        };
        let mut dims = Vec::new();
        let mut leaves = Vec::new();
        flatten(items, 0, &mut dims, &mut leaves)?;
        let dimensions = dims.iter().map(|len| wire::ArrayDimension {
            len: *len,
            lower_bound: 1,
        });
        wire::array_to_sql(
            dimensions,
            member.oid(),
            leaves,
            |value, buf| match value.to_sql(member, buf)? {
                IsNull::Yes => Ok(postgres_protocol::IsNull::Yes),
                IsNull::No => Ok(postgres_protocol::IsNull::No),
            },
            out,
        )?;
        Ok(IsNull::No)
    }
}

/// Collects the leaves of nested lists and their shape; ragged lists are an error.
fn flatten<'a>(
    items: &'a [Value],
    depth: usize,
    dims: &mut Vec<i32>,
    leaves: &mut Vec<&'a Value>,
) -> Result<(), BoxError> {
    let len = i32::try_from(items.len()).map_err(|_| "array too long")?;
    match dims.get(depth) {
        Some(expected) if *expected != len => {
            return Err(
                "multi-dimensional arrays must have sub-arrays of matching dimensions".into(),
            );
        }
        Some(_) => {}
        None if items.is_empty() && depth > 0 => {
            return Err(
                "multi-dimensional arrays must have sub-arrays of matching dimensions".into(),
            );
        }
        None if items.is_empty() => return Ok(()), // an empty array has no dimension
        None => dims.push(len),
    }
    let nested = items
        .iter()
        .filter(|v| matches!(v, Value::Array(_)))
        .count();
    if nested != 0 && nested != items.len() {
        return Err("an array mixes lists and single values".into());
    }
    for item in items {
        match item {
            Value::Array(inner) => flatten(inner, depth + 1, dims, leaves)?,
            leaf => {
                if dims.len() > depth + 1 {
                    return Err(
                        "multi-dimensional arrays must have sub-arrays of matching dimensions"
                            .into(),
                    );
                }
                leaves.push(leaf)
            }
        }
    }
    Ok(())
}

fn out_of_range(value: i64, ty: &Type) -> BoxError {
    format!("value out of {} range: {value}", ty.name()).into()
}

/// A float as decimal text without exponent, for `numeric`.
fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        format!("{f}")
    }
}

fn parse_uuid(text: &str) -> Result<[u8; 16], BoxError> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    let hex = hex.strip_prefix(b"{").unwrap_or(&hex);
    let hex = hex.strip_suffix(b"}").unwrap_or(hex);
    let invalid = || -> BoxError { format!("invalid UUID {text:?}").into() };
    if hex.len() != 32 {
        return Err(invalid());
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        bytes[i] = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(bytes)
}
