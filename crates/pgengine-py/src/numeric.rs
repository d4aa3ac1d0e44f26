//! PostgreSQL `numeric` in its binary form, to and from decimal text (as Python's
//! `Decimal` writes and reads it): base-10000 digit groups, a weight, a sign, a scale.

use std::error::Error;

use bytes::{BufMut, BytesMut};

type BoxError = Box<dyn Error + Sync + Send>;

const POSITIVE: u16 = 0x0000;
const NEGATIVE: u16 = 0x4000;
const NAN: u16 = 0xC000;
const PLUS_INFINITY: u16 = 0xD000;
const MINUS_INFINITY: u16 = 0xF000;

/// Writes decimal text (`-12.50`, `1E+3`, `NaN`, `Infinity`) as a binary `numeric`.
///
/// ```ignore
/// let mut out = bytes::BytesMut::new();
/// encode("12.5", &mut out)?;
/// ```
pub fn encode(text: &str, out: &mut BytesMut) -> Result<(), BoxError> {
    let text = text.trim();
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let special = match unsigned.to_ascii_lowercase().as_str() {
        "nan" | "snan" => Some(NAN),
        "infinity" | "inf" if negative => Some(MINUS_INFINITY),
        "infinity" | "inf" => Some(PLUS_INFINITY),
        _ => None,
    };
    if let Some(sign) = special {
        out.put_i16(0); // no digits
        out.put_i16(0); // weight
        out.put_u16(sign);
        out.put_u16(0); // scale
        return Ok(());
    }
    let invalid = || -> BoxError { format!("invalid numeric value: {text:?}").into() };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (
            &unsigned[..at],
            unsigned[at + 1..].parse::<i64>().map_err(|_| invalid())?,
        ),
        None => (unsigned, 0),
    };
    let (int_digits, frac_digits) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_digits.is_empty() && frac_digits.is_empty()
        || !int_digits
            .bytes()
            .chain(frac_digits.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    // value = digits × 10^point_shift, digits without the point.
    let digits: Vec<u8> = int_digits
        .bytes()
        .chain(frac_digits.bytes())
        .map(|b| b - b'0')
        .collect();
    let scale = frac_digits.len() as i64 - exponent;
    if !(-131072..=16383).contains(&scale) {
        return Err(format!("numeric value out of range: {text:?}").into());
    }
    // Split into integer and fraction digits at the decimal point.
    let point = digits.len() as i64 - scale;
    let (int_part, frac_part): (Vec<u8>, Vec<u8>) = if point >= digits.len() as i64 {
        let mut int_part = digits.clone();
        int_part.resize(point as usize, 0);
        (int_part, Vec::new())
    } else if point <= 0 {
        let mut frac_part = vec![0; (-point) as usize];
        frac_part.extend_from_slice(&digits);
        (Vec::new(), frac_part)
    } else {
        (
            digits[..point as usize].to_vec(),
            digits[point as usize..].to_vec(),
        )
    };
    let dscale = frac_part.len();
    // Group by 4 from the point outwards.
    let int_pad = (4 - int_part.len() % 4) % 4;
    let mut padded_int = vec![0; int_pad];
    padded_int.extend_from_slice(&int_part);
    let mut padded_frac = frac_part.clone();
    padded_frac.resize(frac_part.len().div_ceil(4) * 4, 0);
    let group = |chunk: &[u8]| chunk.iter().fold(0i16, |acc, d| acc * 10 + *d as i16);
    let mut groups: Vec<i16> = padded_int.chunks(4).map(group).collect();
    let mut weight = groups.len() as i64 - 1;
    groups.extend(padded_frac.chunks(4).map(group));
    let leading = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading);
    weight -= leading as i64;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let weight =
        i16::try_from(weight).map_err(|_| format!("numeric value out of range: {text:?}"))?;
    out.put_i16(groups.len() as i16);
    out.put_i16(weight);
    out.put_u16(if negative && !groups.is_empty() {
        NEGATIVE
    } else {
        POSITIVE
    });
    out.put_u16(dscale as u16);
    for g in groups {
        out.put_i16(g);
    }
    Ok(())
}

/// Reads a binary `numeric` as decimal text, keeping its scale (`12.50` stays `12.50`).
///
/// ```ignore
/// assert_eq!(decode(&raw)?, "12.50");
/// ```
pub fn decode(raw: &[u8]) -> Result<String, BoxError> {
    let word = |at: usize| -> Result<u16, BoxError> {
        raw.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric value".into())
    };
    let ndigits = word(0)? as usize;
    let weight = word(2)? as i16 as i64;
    let sign = word(4)?;
    let dscale = word(6)? as usize;
    match sign {
        NAN => return Ok("NaN".into()),
        PLUS_INFINITY => return Ok("Infinity".into()),
        MINUS_INFINITY => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(8 + 2 * i))
        .collect::<Result<_, _>>()?;
    let digit = |index: i64| -> u16 {
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == NEGATIVE {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for index in 0..=weight {
            if index == 0 {
                text.push_str(&digit(index).to_string());
            } else {
                text.push_str(&format!("{:04}", digit(index)));
            }
        }
    }
    if dscale > 0 {
        let mut fraction = String::with_capacity(dscale + 4);
        let mut index = weight + 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit(index)));
            index += 1;
        }
        fraction.truncate(dscale);
        text.push('.');
        text.push_str(&fraction);
    }
    Ok(text)
}
