// The JSON API: cookies go by themselves (HttpOnly: no script reads them); state-changing calls
// carry the session's CSRF token. An expired or revoked session sends the page to the login.
let token = '';

export function setCsrf(t) {
  token = t || '';
}

export function csrf() {
  return token;
}

export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET') headers['X-CSRF-Token'] = token;
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  });
  let data = {};
  try {
    data = await resp.json();
  } catch {
    data = {};
  }
  if (!resp.ok) {
    const err = new Error(data.error || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    err.otpRequired = Boolean(data.otp_required);
    if (resp.status === 401 && !path.endsWith('/login') && !path.endsWith('/session')) {
      window.dispatchEvent(new Event('gatehouse:unauthorized'));
    }
    throw err;
  }
  return data;
}
