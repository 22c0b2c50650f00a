namespace Mamo.Data;

/// <summary>Caption checks shared by every source, and the choice of caption for training or evaluation.</summary>
public static class Captions
{
    /// <summary>Trims captions and drops blank ones; null with a reason when none are left or one is too long.</summary>
    public static IReadOnlyList<string>? Validate(IEnumerable<string> raw, SourceLimits limits, out string? reason)
    {
        var captions = new List<string>();
        foreach (var caption in raw)
        {
            var trimmed = caption.Trim();
            if (trimmed.Length == 0) continue;
            if (trimmed.Length > limits.MaxCaptionChars)
            {
                reason = $"caption longer than {limits.MaxCaptionChars} characters";
                return null;
            }
            captions.Add(trimmed);
        }
        if (captions.Count > limits.MaxCaptions)
        {
            reason = $"more than {limits.MaxCaptions} captions";
            return null;
        }
        reason = captions.Count == 0 ? "empty captions" : null;
        return captions.Count == 0 ? null : captions;
    }

    /// <summary>Training sees one caption per step, drawn from the sample's captions by the caller's seeded random.</summary>
    public static string PickForTraining(IReadOnlyList<string> captions, Random random) =>
        captions[random.Next(captions.Count)];

    /// <summary>
    /// Evaluation uses every caption: one (image index, caption) pair per caption, in order, so text-to-image
    /// retrieval can count a hit for any caption of the right image.
    /// </summary>
    public static IReadOnlyList<(int ImageIndex, string Caption)> ForEvaluation(IReadOnlyList<ImageTextSample> samples)
    {
        var pairs = new List<(int, string)>();
        for (var i = 0; i < samples.Count; i++)
            foreach (var caption in samples[i].Captions) pairs.Add((i, caption));
        return pairs;
    }
}
