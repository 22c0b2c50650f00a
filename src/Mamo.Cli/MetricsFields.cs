using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Mamo.Cli;

/// <summary>Reads the fields of a metrics.jsonl line, for the plots and the dashboard alike. A non-finite number is
/// written as a string ("NaN", "Infinity"); a field that is absent or of another type reads as null.</summary>
static class MetricsFields
{
    static readonly JsonDocumentOptions Strict = new() { AllowDuplicateProperties = false };

    /// <summary>The line as an object; null when it is not JSON, not an object, or names a field twice (which value
    /// would it mean?).</summary>
    public static JsonObject? ParseLine(string line)
    {
        try { return JsonNode.Parse(line, documentOptions: Strict) as JsonObject; }
        catch (JsonException) { return null; }
    }

    public static string? Text(JsonObject line, string name) => line[name] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    public static double? Number(JsonObject line, string name) => Number(line[name]);

    public static double? Number(JsonNode? node)
    {
        if (node is not JsonValue v) return null;
        if (v.GetValueKind() == JsonValueKind.Number) return v.GetValue<double>();
        return v.TryGetValue<string>(out var s) && double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) ? d : null;
    }

    public static long? Integer(JsonObject line, string name) =>
        line[name] is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<long>(out var i) ? i : null;
}
