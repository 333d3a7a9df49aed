//! base122 (wire reference section 6.2, the kevinAlbs variant as base122-rs 0.1.4 encodes it):
//! the text form of Actrix identity usernames.
//!
//! Written here rather than taken from the published crate, whose decoder panics on a code
//! point with illegal-index 6 and allocates per character. The control thread decodes
//! usernames with [`decode_into`]; a shard only asks whether a username could be an identity
//! credential at all ([`decoded_len`], which allocates nothing), so that any other unknown
//! username is refused at once, exactly like a known user with a wrong password.

/// base122 "illegal" 7-bit values, by index (wire section 6.2).
const ILLEGALS: [u8; 6] = [0, 10, 13, 34, 38, 92];
const SHORTENED: u8 = 7;

/// Why a base122 string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A byte sequence that is not a 1- or 2-byte UTF-8 sequence.
    InvalidSequence,
    /// A 2-byte code point with illegal-index 6, which no encoder produces.
    InvalidIndex,
}

/// base122-encode.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let total_bits = data.len() * 8;
    let mut out = Vec::with_capacity(total_bits / 7 + 2);
    let mut pos = 0usize; // bit position
    let get7 = |pos: &mut usize| -> Option<u8> {
        if *pos >= total_bits {
            return None;
        }
        let mut v = 0u8;
        for i in 0..7 {
            let bit_index = *pos + i;
            let bit = if bit_index < total_bits {
                (data[bit_index / 8] >> (7 - (bit_index % 8))) & 1
            } else {
                0
            };
            v = (v << 1) | bit;
        }
        *pos += 7;
        Some(v)
    };
    while let Some(bits) = get7(&mut pos) {
        match ILLEGALS.iter().position(|&x| x == bits) {
            None => out.push(bits),
            Some(index) => {
                let (idx, payload) = match get7(&mut pos) {
                    Some(next) => (index as u8, next),
                    None => (SHORTENED, bits),
                };
                out.push(0b1100_0010 | (idx << 2) | (payload >> 6));
                out.push(0b1000_0000 | (payload & 0b0011_1111));
            }
        }
    }
    out
}

/// Walk `input`, handing every decoded byte to `emit`. Only 1- and 2-byte UTF-8 sequences can
/// come from the encoder, so anything else is refused rather than guessed at.
fn walk(input: &[u8], mut emit: impl FnMut(u8)) -> Result<(), Error> {
    let mut acc: u16 = 0;
    let mut nbits: u32 = 0;
    let mut push7 = |v: u8| {
        acc = (acc << 7) | u16::from(v & 0x7f);
        nbits += 7;
        if nbits >= 8 {
            nbits -= 8;
            emit((acc >> nbits) as u8);
            acc &= (1u16 << nbits) - 1;
        }
    };
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b < 0x80 {
            push7(b);
            i += 1;
        } else if (0xC2..=0xDF).contains(&b) {
            let c = *input.get(i + 1).ok_or(Error::InvalidSequence)?;
            if c & 0xC0 != 0x80 {
                return Err(Error::InvalidSequence);
            }
            let cp = (u16::from(b & 0x1F) << 6) | u16::from(c & 0x3F);
            let index = ((cp >> 8) & 7) as u8;
            if index != SHORTENED {
                let illegal = *ILLEGALS
                    .get(usize::from(index))
                    .ok_or(Error::InvalidIndex)?;
                push7(illegal);
            }
            push7((cp & 127) as u8);
            i += 2;
        } else {
            return Err(Error::InvalidSequence);
        }
    }
    Ok(())
}

/// base122-decode into `out` (cleared first).
pub fn decode_into(input: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    out.clear();
    out.reserve(input.len() * 7 / 8 + 1);
    walk(input, |b| out.push(b))
}

/// base122-decode.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    decode_into(input, &mut out)?;
    Ok(out)
}

/// How many bytes `input` decodes to, or why it is not base122. Allocates nothing.
pub fn decoded_len(input: &[u8]) -> Result<usize, Error> {
    let mut n = 0usize;
    walk(input, |_| n += 1)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_len_agrees_with_decode_and_refuses_what_decode_refuses() {
        for len in [0usize, 1, 7, 8, 9, 100, 257] {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&data);
            assert_eq!(decode(&text).unwrap(), data);
            assert_eq!(decoded_len(&text), Ok(len));
        }
        for bad in [&[0xFFu8][..], &[0xC2], &[0xC2, 0x00], &[0xDA, 0x80]] {
            assert_eq!(
                decoded_len(bad).is_err(),
                decode(bad).is_err(),
                "{bad:02x?}"
            );
            assert!(decoded_len(bad).is_err());
        }
    }
}
