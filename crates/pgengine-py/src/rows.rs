//! Rows to Python, as asyncpg gives them: a list of dicts keyed by column name, values
//! of asyncpg's Python types (Decimal for numeric, aware datetime in UTC for timestamptz,
//! timedelta for interval, str for json/jsonb, lists for arrays, `date.max`/`min` for
//! infinity). A column of a type it cannot read is a `TypeError` naming it.

use std::error::Error;

use chrono::{Datelike, NaiveDate, TimeDelta};
use pgengine::Row;
use pgengine::types::{FromSql, Kind, Type};
use postgres_protocol::types as wire;
use pyo3::IntoPyObjectExt;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBytes, PyDate, PyDateTime, PyDelta, PyDict, PyList, PyString, PyTime, PyTzInfo,
};

use crate::numeric;
use crate::{decimal_class, uuid_class};

type BoxError = Box<dyn Error + Sync + Send>;

const DAY_MICROS: i64 = 86_400_000_000;

/// Rows of one result, turned into a `list[dict]` when handed to Python.
///
/// ```ignore
/// future_into_py(py, async move { Ok(Rows(engine.fetch(query).await?)) })
/// ```
pub struct Rows(pub Vec<Row>);

impl<'py> IntoPyObject<'py> for Rows {
    type Target = PyList;
    type Output = Bound<'py, PyList>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let Some(first) = self.0.first() else {
            return Ok(PyList::empty(py));
        };
        let keys: Vec<Bound<'py, PyString>> = first
            .columns()
            .iter()
            .map(|column| PyString::new(py, column.name()))
            .collect();
        let list = PyList::empty(py);
        for row in &self.0 {
            let dict = PyDict::new(py);
            for (index, (key, column)) in keys.iter().zip(row.columns()).enumerate() {
                let raw: Raw<'_> = row
                    .try_get(index)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                let value = match raw.0 {
                    None => py.None().into_bound(py),
                    Some(bytes) => decode(py, column.type_(), bytes).map_err(|e| {
                        PyTypeError::new_err(format!(
                            "cannot read column {:?} of type {}: {e}",
                            column.name(),
                            column.type_().name()
                        ))
                    })?,
                };
                dict.set_item(key, value)?;
            }
            list.append(dict)?;
        }
        Ok(list)
    }
}

/// A column's bytes as the server sent them (binary format), `None` for NULL.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Raw(Some(raw)))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// One non-NULL value of type `ty`.
fn decode<'py>(py: Python<'py>, ty: &Type, raw: &[u8]) -> Result<Bound<'py, PyAny>, BoxError> {
    match ty.kind() {
        Kind::Domain(base) => return decode(py, base, raw),
        Kind::Array(member) => return decode_array(py, member, raw),
        Kind::Enum(_) => return Ok(PyString::new(py, wire::text_from_sql(raw)?).into_any()),
        _ => {}
    }
    let value = match ty.name() {
        "bool" => wire::bool_from_sql(raw)?.into_bound_py_any(py)?,
        "int2" => wire::int2_from_sql(raw)?.into_bound_py_any(py)?,
        "int4" => wire::int4_from_sql(raw)?.into_bound_py_any(py)?,
        "int8" => wire::int8_from_sql(raw)?.into_bound_py_any(py)?,
        "oid" => wire::oid_from_sql(raw)?.into_bound_py_any(py)?,
        "float4" => (wire::float4_from_sql(raw)? as f64).into_bound_py_any(py)?,
        "float8" => wire::float8_from_sql(raw)?.into_bound_py_any(py)?,
        "numeric" => decimal_class(py)?.call1((numeric::decode(raw)?,))?,
        "text" | "varchar" | "bpchar" | "name" | "unknown" | "json" | "xml" | "citext" | "char"
        | "regclass" => {
            if ty.name() == "char" {
                // "char" is one byte.
                PyString::new(py, &String::from_utf8_lossy(raw)).into_any()
            } else {
                PyString::new(py, wire::text_from_sql(raw)?).into_any()
            }
        }
        "jsonb" => match raw.split_first() {
            Some((1, json)) => PyString::new(py, std::str::from_utf8(json)?).into_any(),
            _ => return Err("unsupported jsonb version".into()),
        },
        "bytea" => PyBytes::new(py, wire::bytea_from_sql(raw)).into_any(),
        "uuid" => {
            let bytes = PyBytes::new(py, &wire::uuid_from_sql(raw)?);
            let kwargs = PyDict::new(py);
            kwargs.set_item("bytes", bytes)?;
            uuid_class(py)?.call((), Some(&kwargs))?
        }
        "date" => date(py, wire::date_from_sql(raw)?)?,
        "timestamp" => timestamp(py, wire::timestamp_from_sql(raw)?, None)?,
        "timestamptz" => timestamp(
            py,
            wire::timestamp_from_sql(raw)?,
            Some(&PyTzInfo::utc(py)?.to_owned()),
        )?,
        "time" => {
            let (h, m, s, us) = clock(wire::time_from_sql(raw)?);
            PyTime::new(py, h, m, s, us, None)?.into_any()
        }
        "timetz" => {
            let micros = i64::from_be_bytes(raw.get(..8).ok_or("truncated timetz")?.try_into()?);
            let west = i32::from_be_bytes(raw.get(8..12).ok_or("truncated timetz")?.try_into()?);
            let offset = PyDelta::new(py, 0, -west, 0, true)?;
            let tz = PyTzInfo::fixed_offset(py, offset)?;
            let (h, m, s, us) = clock(micros);
            PyTime::new(py, h, m, s, us, Some(&tz))?.into_any()
        }
        "interval" => {
            let micros = i64::from_be_bytes(raw.get(..8).ok_or("truncated interval")?.try_into()?);
            let days = i32::from_be_bytes(raw.get(8..12).ok_or("truncated interval")?.try_into()?);
            let months =
                i32::from_be_bytes(raw.get(12..16).ok_or("truncated interval")?.try_into()?);
            // As asyncpg: a month is 30 days.
            let days = days as i64 + months as i64 * 30 + micros.div_euclid(DAY_MICROS);
            let rest = micros.rem_euclid(DAY_MICROS);
            PyDelta::new(
                py,
                i32::try_from(days)?,
                (rest / 1_000_000) as i32,
                (rest % 1_000_000) as i32,
                true,
            )?
            .into_any()
        }
        "void" => py.None().into_bound(py),
        other => return Err(format!("no Python conversion for PostgreSQL type {other}").into()),
    };
    Ok(value)
}

fn pg_epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).expect("a valid date")
}

fn python_date(days: i64) -> Result<NaiveDate, BoxError> {
    pg_epoch()
        .checked_add_signed(TimeDelta::try_days(days).ok_or("date out of range")?)
        .filter(|d| (1..=9999).contains(&d.year()))
        .ok_or_else(|| "date out of Python's range (years 1 to 9999)".into())
}

/// `infinity` and `-infinity` become `date.max` and `date.min`, as in asyncpg.
fn date<'py>(py: Python<'py>, days: i32) -> Result<Bound<'py, PyAny>, BoxError> {
    let date = match days {
        i32::MAX => NaiveDate::from_ymd_opt(9999, 12, 31).expect("valid"),
        i32::MIN => NaiveDate::from_ymd_opt(1, 1, 1).expect("valid"),
        days => python_date(days.into())?,
    };
    Ok(PyDate::new(py, date.year(), date.month() as u8, date.day() as u8)?.into_any())
}

/// `infinity` and `-infinity` become `datetime.max` and `datetime.min`, as in asyncpg.
fn timestamp<'py>(
    py: Python<'py>,
    micros: i64,
    tz: Option<&Bound<'py, PyTzInfo>>,
) -> Result<Bound<'py, PyAny>, BoxError> {
    let (date, (h, m, s, us)) = match micros {
        i64::MAX => (
            NaiveDate::from_ymd_opt(9999, 12, 31).expect("valid"),
            (23, 59, 59, 999_999),
        ),
        i64::MIN => (
            NaiveDate::from_ymd_opt(1, 1, 1).expect("valid"),
            (0, 0, 0, 0),
        ),
        micros => (
            python_date(micros.div_euclid(DAY_MICROS))?,
            clock(micros.rem_euclid(DAY_MICROS)),
        ),
    };
    Ok(PyDateTime::new(
        py,
        date.year(),
        date.month() as u8,
        date.day() as u8,
        h,
        m,
        s,
        us,
        tz,
    )?
    .into_any())
}

/// Hours, minutes, seconds and microseconds of a time of day in microseconds.
fn clock(micros: i64) -> (u8, u8, u8, u32) {
    let seconds = micros / 1_000_000;
    (
        (seconds / 3600) as u8,
        (seconds / 60 % 60) as u8,
        (seconds % 60) as u8,
        (micros % 1_000_000) as u32,
    )
}

fn decode_array<'py>(
    py: Python<'py>,
    member: &Type,
    raw: &[u8],
) -> Result<Bound<'py, PyAny>, BoxError> {
    use postgres_protocol::types::ArrayDimension;
    let array = wire::array_from_sql(raw)?;
    let dims: Vec<usize> = fallible_collect(array.dimensions())?
        .into_iter()
        .map(|d: ArrayDimension| d.len as usize)
        .collect();
    let mut values = Vec::new();
    let mut iter = array.values();
    while let Some(value) = fallible_iterator::FallibleIterator::next(&mut iter)? {
        values.push(match value {
            None => py.None().into_bound(py),
            Some(bytes) => decode(py, member, bytes)?,
        });
    }
    if dims.is_empty() {
        return Ok(PyList::empty(py).into_any());
    }
    let mut values = values.into_iter();
    nest(py, &dims, &mut values)
}

fn fallible_collect<I: fallible_iterator::FallibleIterator>(
    mut iter: I,
) -> Result<Vec<I::Item>, I::Error> {
    let mut out = Vec::new();
    while let Some(item) = iter.next()? {
        out.push(item);
    }
    Ok(out)
}

/// Builds nested lists of the array's shape from its values in order.
fn nest<'py>(
    py: Python<'py>,
    dims: &[usize],
    values: &mut impl Iterator<Item = Bound<'py, PyAny>>,
) -> Result<Bound<'py, PyAny>, BoxError> {
    let list = PyList::empty(py);
    for _ in 0..dims[0] {
        if dims.len() == 1 {
            list.append(values.next().ok_or("array shorter than its dimensions")?)?;
        } else {
            list.append(nest(py, &dims[1..], values)?)?;
        }
    }
    Ok(list.into_any())
}
