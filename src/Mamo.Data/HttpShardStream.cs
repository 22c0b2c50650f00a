using System.Net;
using System.Net.Http.Headers;

namespace Mamo.Data;

/// <summary>
/// One WebDataset shard over HTTP(S), read front to back as the tar reader asks for it: streamed, never downloaded
/// whole. A connection that drops or stalls mid-shard is resumed where it broke, with a Range request whose If-Range
/// carries the first response's validator, so a shard replaced on the server in between is never stitched from two
/// files; a server that ignores Range sends the shard again and the bytes already read are skipped. After
/// <see cref="MaxRetries"/> failures in a row it gives up with an IOException, which the reader turns into a dead letter
/// for the rest of the shard. A 4xx answer is not retried.
/// </summary>
public sealed class HttpShardStream : Stream
{
    public const int MaxRetries = 5;
    private static readonly TimeSpan FirstBackoff = TimeSpan.FromMilliseconds(200), StallTimeout = TimeSpan.FromSeconds(60);
    private static readonly HttpClient Client = new(new SocketsHttpHandler
    {
        ConnectTimeout = TimeSpan.FromSeconds(30),
        AutomaticDecompression = DecompressionMethods.None,
    })
    { Timeout = TimeSpan.FromSeconds(60) };   // up to the response headers: the body is read with StallTimeout per read

    private readonly Uri _uri;
    private readonly CancellationToken _ct;
    private HttpResponseMessage? _response;
    private Stream? _body;
    private long _position;
    private long? _length;
    private EntityTagHeaderValue? _etag;
    private DateTimeOffset? _lastModified;
    private int _failures;

    private HttpShardStream(Uri uri, CancellationToken ct) => (_uri, _ct) = (uri, ct);

    /// <summary>How often a broken transfer was taken up again.</summary>
    public int Resumes { get; private set; }

    /// <summary>Opens the shard: the first response must be a success (an error answer throws HttpRequestException,
    /// a network failure is retried as a broken transfer is).</summary>
    public static HttpShardStream Open(Uri uri, CancellationToken ct)
    {
        var stream = new HttpShardStream(uri, ct);
        try
        {
            stream.WithRetries(() => stream._body ??= stream.Connect());
            return stream;
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    public override int Read(byte[] buffer, int offset, int count)
    {
        try
        {
            var n = WithRetries(() =>
            {
                _body ??= Connect();
                using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_ct);
                timeout.CancelAfter(StallTimeout);
                var read = _body.ReadAsync(buffer.AsMemory(offset, count), timeout.Token).AsTask().GetAwaiter().GetResult();
                if (read == 0 && _length is { } length && _position < length)
                    throw new IOException($"the connection closed at byte {_position} of {length}");
                return read;
            });
            _position += n;
            return n;
        }
        catch (HttpRequestException e)
        {
            throw new IOException($"{_uri}: {e.Message}", e);   // what a reader of a stream expects
        }
    }

    private T WithRetries<T>(Func<T> attempt)
    {
        while (true)
        {
            try
            {
                var result = attempt();
                _failures = 0;
                return result;
            }
            catch (Exception e) when (!_ct.IsCancellationRequested && e is IOException or OperationCanceledException
                                          or HttpRequestException { StatusCode: null or >= HttpStatusCode.InternalServerError })
            {
                Drop();
                if (++_failures > MaxRetries)
                    throw new IOException($"{_uri}: gave up after {MaxRetries} retries at byte {_position}: {e.Message}", e);
                Resumes++;
                _ct.WaitHandle.WaitOne(FirstBackoff * (1 << (_failures - 1)));
                _ct.ThrowIfCancellationRequested();
            }
        }
    }

    private Stream Connect()
    {
        using var request = new HttpRequestMessage(HttpMethod.Get, _uri);
        if (_position > 0)
        {
            request.Headers.Range = new RangeHeaderValue(_position, null);
            if (_etag is not null) request.Headers.IfRange = new RangeConditionHeaderValue(_etag);
            else if (_lastModified is { } modified) request.Headers.IfRange = new RangeConditionHeaderValue(modified);
        }
        _response = Client.Send(request, HttpCompletionOption.ResponseHeadersRead, _ct);
        var status = _response.StatusCode;
        if (status == HttpStatusCode.PartialContent && _position > 0)
        {
            if (_response.Content.Headers.ContentRange?.From != _position)
                throw new IOException($"the server resumed at byte {_response.Content.Headers.ContentRange?.From}, not {_position}");
            return _response.Content.ReadAsStream(_ct);
        }
        if (status != HttpStatusCode.OK)
            throw new HttpRequestException($"HTTP {(int)status} {_response.ReasonPhrase}", null, status);
        var body = _response.Content.ReadAsStream(_ct);
        if (_position == 0)
        {
            (_etag, _lastModified, _length) = (_response.Headers.ETag, _response.Content.Headers.LastModified, _response.Content.Headers.ContentLength);
            return body;
        }
        // The whole shard again: the server ignores Range, or the shard changed and If-Range asked for all of it.
        if (_response.Headers.ETag is { } etag && _etag is not null && !etag.Equals(_etag) || _response.Content.Headers.ContentLength != _length)
            throw new HttpRequestException($"the shard changed on the server while it was read (at byte {_position})", null, HttpStatusCode.Conflict);
        var skip = new byte[1 << 16];
        for (var left = _position; left > 0;)
        {
            var n = body.Read(skip, 0, (int)Math.Min(skip.Length, left));
            if (n == 0) throw new IOException($"the shard ended at byte {_position - left} while skipping to byte {_position}");
            left -= n;
        }
        return body;
    }

    private void Drop()
    {
        _body?.Dispose();
        _response?.Dispose();
        (_body, _response) = (null, null);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) Drop();
        base.Dispose(disposing);
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => _position; set => throw new NotSupportedException(); }
    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}
