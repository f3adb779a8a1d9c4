//! Tokens from windows and back. A field window arrives as a hyperslab, laid out (time, level,
//! lat, lon); tokens are ordered (level, t, lat, lon) and the values inside a token are
//! (t, lat, lon), the AtmoRep convention of DESIGN §3. Both directions are pure permutations, so
//! `untokenize(tokenize(x)) == x` bit for bit.

use atmorep_proto::FieldGeometry;

/// Calls `f(window index, token-order index)` for every value of a field window; the one
/// traversal both directions share so they cannot disagree.
fn for_each_pair(field: &FieldGeometry, mut f: impl FnMut(usize, usize)) {
    let levels = field.num_levels();
    let [nt, ny, nx] = field.geometry.num_tokens;
    let [st, sy, sx] = field.geometry.token_size;
    let [_, wy, wx] = field.geometry.window();
    let mut k = 0;
    for l in 0..levels {
        for tt in 0..nt {
            for ty in 0..ny {
                for tx in 0..nx {
                    for t in 0..st {
                        let time = tt * st + t;
                        for y in 0..sy {
                            let row = ((time * levels + l) * wy + ty * sy + y) * wx + tx * sx;
                            for x in 0..sx {
                                f(row + x, k);
                                k += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    debug_assert_eq!(k, field.numel());
}

/// Window values (time, level, lat, lon) → tokens (level, t, lat, lon) × (t, lat, lon).
pub fn tokenize(field: &FieldGeometry, window: &[f32]) -> Vec<f32> {
    tokenize_into(field, window, Vec::new())
}

/// [`tokenize`] into a reused buffer (resized as needed), sparing a fresh allocation.
pub fn tokenize_into(field: &FieldGeometry, window: &[f32], mut tokens: Vec<f32>) -> Vec<f32> {
    assert_eq!(
        window.len(),
        field.numel(),
        "window size does not match the token geometry"
    );
    tokens.resize(window.len(), 0.0);
    for_each_pair(field, |w, k| tokens[k] = window[w]);
    tokens
}

/// The exact inverse of [`tokenize`].
pub fn untokenize(field: &FieldGeometry, tokens: &[f32]) -> Vec<f32> {
    assert_eq!(
        tokens.len(),
        field.numel(),
        "token count does not match the token geometry"
    );
    let mut window = vec![0.0; tokens.len()];
    for_each_pair(field, |w, k| window[w] = tokens[k]);
    window
}

#[cfg(test)]
mod tests {
    use super::*;
    use atmorep_proto::TokenGeometry;

    fn field(levels: usize, num_tokens: [usize; 3], token_size: [usize; 3]) -> FieldGeometry {
        FieldGeometry::new(
            (0..levels).collect(),
            TokenGeometry::new(num_tokens, token_size),
        )
    }

    #[test]
    fn tokenize_then_untokenize_is_exact() {
        let layout = field(2, [2, 3, 4], [3, 2, 5]);
        let window: Vec<f32> = (0..layout.numel()).map(|i| i as f32 * 0.5 - 7.0).collect();
        let tokens = tokenize(&layout, &window);
        assert_eq!(untokenize(&layout, &tokens), window);
        assert_ne!(tokens, window);
        // A reused buffer of another size gives the same tokens.
        assert_eq!(tokenize_into(&layout, &window, vec![9.0; 5]), tokens);
    }

    #[test]
    fn token_order_is_level_time_lat_lon() {
        // 1 level, 2×1×2 tokens of 1×1×2 points: window row-major (t, lat, lon) = 0..8.
        let layout = field(1, [2, 1, 2], [1, 1, 2]);
        let window: Vec<f32> = (0..8).map(|i| i as f32).collect();
        // token (t0, x0) = [0, 1], (t0, x1) = [2, 3], (t1, x0) = [4, 5], (t1, x1) = [6, 7].
        assert_eq!(tokenize(&layout, &window), window);
        // With two levels the window interleaves levels per time step: (t, l, lon).
        let two = field(2, [2, 1, 2], [1, 1, 2]);
        let window: Vec<f32> = (0..16).map(|i| i as f32).collect();
        // Level 0 values are window[t*8 + x] for x in 0..4, level 1 window[t*8 + 4 + x].
        let expected: Vec<f32> = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
            .iter()
            .map(|&i| i as f32)
            .collect();
        assert_eq!(tokenize(&two, &window), expected);
    }
}
